"""Hidden cache sharded along d for tensor parallel (docs/ARCHITECTURE.md section 2, "Sharded form").

With t ranks, a replicated hidden vector costs d per rank against 2*n_kv*D/t for KV, so the
saving is gone at t >= 2. Storing only the rank's d/t slice of x keeps r per rank equal to r
at t = 1. Attention then needs every rank's slice, which the math allows without gathering x:
scores and value projections are sums over d, so each rank computes its partial sum for ALL
heads and one all-reduce adds them. Each rank holds the W_k and W_v *column* slices for its
d-slice, over all heads (`w_k_cols`, `w_v_cols`: [n_kv * D, d/t], about +17% weights).

Communication per layer and step: all-gather of q (N*H*D), all-reduce of scores (N*H*ctx),
all-reduce of the outputs (N*H*D). Conversion and recompute all-reduce full K/V of the context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aptray_kernels import ops
from aptray_kernels.reference import apply_rotary

from aptray.model.parallel import all_gather, all_reduce, tp_rank, tp_world


def d_slice(d: int) -> slice:
    """This rank's slice of the hidden dimension."""
    world = tp_world()
    if d % world:
        raise ValueError(f"hidden size ({d}) is not divisible by tensor_parallel_size ({world})")
    n = d // world
    return slice(tp_rank() * n, (tp_rank() + 1) * n)


def _local_rows(full: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's block of heads along dim of a tensor that covers all heads."""
    n = full.shape[dim] // tp_world()
    return full.narrow(dim, tp_rank() * n, n)


def sharded_absorbed_decode_attention(q, hidden_cache, block_tables, context_lens, w_k_cols, w_v_cols, b_v,
                                      scale: float) -> torch.Tensor:
    """Absorbed decode attention over a d-sharded hidden cache.

    q [N, H/t, D] (this rank's heads); hidden_cache [blocks, Bh, d/t]; w_k_cols, w_v_cols
    [n_kv * D, d/t] (all heads, this rank's columns); b_v [n_kv/t * D] or None (this rank's heads).
    Returns this rank's heads [N, H/t, D], equal to absorbed attention on the whole hidden vector.
    """
    n, _, head_dim = q.shape
    q_all = all_gather(q, 1).float()  # [N, H, D]
    num_heads = q_all.shape[1]
    n_kv = w_k_cols.shape[0] // head_dim
    group = num_heads // n_kv
    max_len = int(context_lens.max())
    mask = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None]
    # zero x past each row's length: unfilled slots may hold NaN/Inf bits, and 0 * NaN = NaN
    x = ops.gather_hidden(hidden_cache, block_tables, max_len).float().masked_fill(~mask[:, :, None], 0.0)
    wk = w_k_cols.float().view(n_kv, head_dim, -1)
    wv = w_v_cols.float().view(n_kv, head_dim, -1)
    u = torch.einsum("ngqe,ged->ngqd", q_all.view(n, n_kv, group, head_dim), wk)
    scores = all_reduce(torch.einsum("ngqd,nld->ngql", u, x)) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    y = torch.einsum("ngql,nld->ngqd", probs, x)  # this rank's slice of the weighted sum
    out = all_reduce(torch.einsum("ngqd,ged->ngqe", y, wv)).reshape(n, num_heads, head_dim)
    out = _local_rows(out, 1)
    if b_v is not None:
        out = out + b_v.float().view(1, -1, head_dim)
    return out.to(q.dtype)


def sharded_project_kv(x, w_k_cols, b_k, w_v_cols, b_v, head_dim: int, cos=None, sin=None):
    """K, V [L, n_kv/t, D] of this rank's heads from its hidden slices x [L, d/t] (positions 0..L-1).

    Each rank projects its slice for all heads; one all-reduce sums the slices. b_k, b_v are this
    rank's heads' biases or None.
    """
    kv = all_reduce(torch.cat((F.linear(x, w_k_cols), F.linear(x, w_v_cols)), dim=-1))
    k_all, v_all = kv.unflatten(-1, (2, -1, head_dim)).unbind(-3)
    k, v = _local_rows(k_all, -2), _local_rows(v_all, -2)
    if b_k is not None:
        k = k + b_k.view(-1, head_dim)
    if b_v is not None:
        v = v + b_v.view(-1, head_dim)
    if cos is not None:
        k = apply_rotary(k, torch.arange(x.shape[-2], device=x.device), cos, sin)
    return k.contiguous(), v.contiguous()
