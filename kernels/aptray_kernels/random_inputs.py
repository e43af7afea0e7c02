"""Random paged-cache inputs for checking the kernels against the references (tests/test_kernels.py on
CPU through the Triton interpreter, loadgen.gpu_check on a GPU). All draws come from a CPU generator."""
from __future__ import annotations

import math

import torch


def paged_rows(block_size: int, context_lens, num_blocks_extra: int = 3, gen=None):
    """Block tables [N, max_blocks] with distinct shuffled blocks per row (padding 0), the pool size, and
    the context lengths as a tensor."""
    per_row = [math.ceil(length / block_size) for length in context_lens]
    num_blocks = sum(per_row) + num_blocks_extra
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(context_lens), max(per_row), dtype=torch.int64)
    used = 0
    for row, count in enumerate(per_row):
        tables[row, :count] = order[used:used + count]
        used += count
    return tables, num_blocks, torch.tensor(context_lens, dtype=torch.int64)


def poison_unfilled(cache, tables, context_lens, block_size: int) -> None:
    """NaN in the unused slots of each row's partially filled last block: they must never reach the output."""
    for row, length in enumerate(context_lens.tolist()):
        filled = length % block_size
        if filled:
            last = tables[row, (length - 1) // block_size]
            if cache.dim() == 5:  # kv cache [blocks, 2, B, n_kv, D]
                cache[last, :, filled:] = float("nan")
            else:  # hidden cache [blocks, Bh, d]
                cache[last, filled:] = float("nan")


def attention_weights(n_kv: int, head_dim: int, width: int, bias: bool, gen):
    """w_k, b_k, w_v, b_v of one layer (this rank's rows), scaled to keep scores of order one."""
    w_k = torch.randn(n_kv * head_dim, width, generator=gen) / width ** 0.5
    w_v = torch.randn(n_kv * head_dim, width, generator=gen) / width ** 0.5
    b_k = torch.randn(n_kv * head_dim, generator=gen) if bias else None
    b_v = torch.randn(n_kv * head_dim, generator=gen) if bias else None
    return w_k, b_k, w_v, b_v


def rotary_tables(max_pos: int, head_dim: int):
    """Neox rotary cos, sin [max_pos, head_dim / 2]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()
