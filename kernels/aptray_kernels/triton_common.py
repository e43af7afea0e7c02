"""Small helpers shared by the Triton kernel wrappers."""
from __future__ import annotations

import torch

# tl.dot needs every dimension >= 16 on NVIDIA tensor cores, so tiles are padded up to it.
MIN_DOT = 16
# Enough programs to cover an H100/H200 (132 SMs) about twice when splitting long contexts.
TARGET_PROGRAMS = 264


def pow2(n: int, lo: int = MIN_DOT) -> int:
    """Next power of two >= max(n, lo): Triton tile sizes must be powers of two."""
    p = lo
    while p < n:
        p *= 2
    return p


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied exactly ("ieee"), not in TF32, so fp32 results match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def split_plan(max_len: int, parallel: int, block_t: int, num_splits: int | None = None):
    """(split_len, num_splits) for flash-decoding: split contexts only when rows x heads cannot fill the GPU."""
    tiles = max(cdiv(max_len, block_t), 1)
    if num_splits is None:
        num_splits = max(1, min(tiles, cdiv(TARGET_PROGRAMS, max(parallel, 1))))
    split_len = cdiv(tiles, max(1, min(num_splits, tiles))) * block_t
    return split_len, cdiv(max(max_len, 1), split_len)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
