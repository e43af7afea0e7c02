"""Linear, embedding and norm layers whose weights are sliced per tensor-parallel rank at load time.

Every parameter carries a `weight_loader(param, tensor_slice)`; the loader hands it a lazy
safetensors slice, so a rank reads only its part of each tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptray.model.parallel import all_gather_last_dim, all_reduce, split, tp_rank, tp_world


def _load_rows(param: nn.Parameter, loaded) -> None:
    """Take this rank's block of rows (dim 0)."""
    n = param.shape[0]
    start = tp_rank() * n
    param.data.copy_(loaded[start:start + n])


def _load_cols(param: nn.Parameter, loaded) -> None:
    """Take this rank's block of columns (dim 1)."""
    n = param.shape[1]
    start = tp_rank() * n
    param.data.copy_(loaded[:, start:start + n])


def _load_whole(param: nn.Parameter, loaded) -> None:
    param.data.copy_(loaded[:])


def _param(shape, loader, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over ranks; each rank keeps its slice of y."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32):
        super().__init__()
        out = split(out_features, "output features")
        self.weight = _param((out, in_features), _load_rows, dtype)
        self.bias = _param((out,), _load_rows, dtype) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def fuse_columns(*linears: ColumnParallelLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several column-parallel linears reading the same input (q/k/v,
    gate/up): one GEMM instead of several. Each linear's parameters become row views of the fused
    tensors, so loading (per-rank slices, by the checkpoint's names) fills the fused weight in place."""
    tensors = []
    for name in ("weight", "bias"):
        params = [getattr(lin, name) for lin in linears]
        if all(p is None for p in params):
            tensors.append(None)
            continue
        if any(p is None for p in params):
            raise ValueError(f"cannot fuse linears of which only some have a {name}")
        fused = torch.cat([p.data for p in params])
        start = 0
        for p in params:
            p.data = fused[start:start + p.shape[0]]
            start += p.shape[0]
        tensors.append(fused)
    return tensors[0], tensors[1]


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32):
        super().__init__()
        self.weight = _param((out_features, split(in_features, "input features")), _load_cols, dtype)
        self.bias = _param((out_features,), _load_whole, dtype) if bias else None

    def forward(self, x):
        y = all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; out-of-range ids on a rank contribute zeros."""

    def __init__(self, vocab_size: int, dim: int, dtype=torch.float32):
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp_world())
        self.start = tp_rank() * self.per_rank
        self.weight = _param((self.per_rank, dim), self._load, dtype)

    def _load(self, param, loaded) -> None:
        rows = loaded[self.start:min(self.start + self.per_rank, self.vocab_size)]
        param.data.zero_()
        param.data[:rows.shape[0]].copy_(rows)

    def forward(self, ids):
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside.unsqueeze(-1)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary slice of each rank, gathered to full width."""

    def logits(self, x):
        full = all_gather_last_dim(F.linear(x, self.weight))
        return full[..., :self.vocab_size]
