"""Triton kernels that move tokens in and out of the paged caches (layouts in reference.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import cdiv, last_dim_contiguous, pow2


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, slots_ptr, cache_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ckv, stride_ct, stride_ch,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIM_P: tl.constexpr):
    # One program per (token, kv head): a D-vector of K and one of V.
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    dims = tl.arange(0, DIM_P)
    ok = dims < HEAD_DIM
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + h * stride_ch + dims
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + dims, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dims, mask=ok)
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=ok)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store k, v [T, n_kv, D] at slots [T] of kv_cache [num_blocks, 2, B, n_kv, D]."""
    tokens, n_kv, head_dim = k.shape
    if tokens == 0:
        return
    assert kv_cache.stride(-1) == 1
    k, v, slots = last_dim_contiguous(k), last_dim_contiguous(v), slots.contiguous()
    _write_kv_kernel[(tokens, n_kv)](
        k, v, slots, kv_cache,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        HEAD_DIM=head_dim, BLOCK_SIZE=kv_cache.shape[2], DIM_P=pow2(head_dim, 1))


@triton.jit
def _write_hidden_kernel(x_ptr, slots_ptr, cache_ptr, stride_xt, stride_cb, stride_ct,
                         WIDTH: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, chunk of d).
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < WIDTH
    slot = tl.load(slots_ptr + t).to(tl.int64)
    x = tl.load(x_ptr + t * stride_xt + cols, mask=ok)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + cols
    tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=ok)


def write_hidden(hidden_cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Store hidden vectors x [T, d] at slots [T] of hidden_cache [num_blocks, Bh, d]."""
    tokens, width = x.shape
    if tokens == 0:
        return
    assert hidden_cache.stride(-1) == 1
    x, slots = last_dim_contiguous(x), slots.contiguous()
    block_d = min(pow2(width, 1), 1024)
    _write_hidden_kernel[(tokens, cdiv(width, block_d))](
        x, slots, hidden_cache, x.stride(0), hidden_cache.stride(0), hidden_cache.stride(1),
        WIDTH=width, BLOCK_SIZE=hidden_cache.shape[1], BLOCK_D=block_d)


@triton.jit
def _gather_hidden_kernel(cache_ptr, block_tables_ptr, out_ptr, max_len,
                          stride_cb, stride_ct, stride_btn, stride_on, stride_ot,
                          WIDTH: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (tile of positions, row, chunk of d); positions past a row's length are copied
    # like the reference does (they come from whatever block the table names there).
    pos = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1).to(tl.int64)  # row offsets can pass 2**31 elements
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    pos_ok = pos < max_len
    blk = tl.load(block_tables_ptr + n * stride_btn + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    ok = pos_ok[:, None] & (cols < WIDTH)[None, :]
    src = cache_ptr + (blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct)[:, None] + cols[None, :]
    x = tl.load(src, mask=ok)
    tl.store(out_ptr + n * stride_on + pos[:, None].to(tl.int64) * stride_ot + cols[None, :], x, mask=ok)


def gather_hidden(hidden_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Hidden vectors [N, max_len, d] for each row's blocks (positions past its length are garbage)."""
    n = block_tables.shape[0]
    width = hidden_cache.shape[-1]
    out = torch.empty(n, max_len, width, dtype=hidden_cache.dtype, device=hidden_cache.device)
    if n == 0 or max_len == 0:
        return out
    assert hidden_cache.stride(-1) == 1
    block_tables = last_dim_contiguous(block_tables)
    block_t, block_d = 16, min(pow2(width, 1), 256)
    _gather_hidden_kernel[(cdiv(max_len, block_t), n, cdiv(width, block_d))](
        hidden_cache, block_tables, out, max_len,
        hidden_cache.stride(0), hidden_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        WIDTH=width, BLOCK_SIZE=hidden_cache.shape[1], BLOCK_T=block_t, BLOCK_D=block_d)
    return out
