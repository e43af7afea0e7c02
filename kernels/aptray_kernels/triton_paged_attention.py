"""Paged decode attention over KV blocks: flash-decoding (split-K) Triton kernel, GQA aware, fp32 accumulation.

One program per (row, kv head, context split) loads each K/V tile once for all the query heads of its
group. Splits only happen when rows x kv heads cannot fill the GPU; a second kernel merges them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import dot_precision, last_dim_contiguous, pow2, split_plan

BLOCK_T = 32  # tokens per tile; any cache block size works since each token is addressed via the table


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr,
                         out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
                         scale, split_len, num_splits, num_heads,
                         stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_btn, stride_on, stride_oh,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         GROUP_P: tl.constexpr, DIM_P: tl.constexpr, BLOCK_T: tl.constexpr,
                         SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
    g = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + n).to(tl.int32)
    rows = tl.arange(0, GROUP_P)
    dims = tl.arange(0, DIM_P)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = g * GROUP + rows
    q = tl.load(q_ptr + n * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(k_ptr.dtype.element_ty)

    start = s * split_len
    end = tl.minimum(start + split_len, ctx)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        ok = pos < end
        blk = tl.load(block_tables_ptr + n * stride_btn + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        tok = blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt + g * stride_kh
        kv_ok = ok[:, None] & dim_ok[None, :]
        # Masked loads return 0, never stale garbage, so NaNs in unused slots cannot leak into the dot.
        k = tl.load(k_ptr + tok[:, None] + dims[None, :], mask=kv_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [GROUP_P, BLOCK_T]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every tile has at least one valid token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + tok[:, None] + dims[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_ok = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        # Normalised partial output plus its (max, sum) so the merge can reweight it; an empty split has l = 0.
        part = (n * num_heads + heads) * num_splits + s
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / l_safe[:, None], mask=out_ok)
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + n * stride_on + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, num_splits, num_heads,
                         stride_on, stride_oh,
                         HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr, SPLITS_P: tl.constexpr):
    # One program per (row, head): softmax-weighted sum of the split partials.
    n = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
    h = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P)
    dims = tl.arange(0, DIM_P)
    s_ok = splits < num_splits
    base = (n * num_heads + h) * num_splits
    m = tl.load(part_m_ptr + base + splits, mask=s_ok, other=float("-inf"))
    l = tl.load(part_l_ptr + base + splits, mask=s_ok, other=0.0)
    w = l * tl.exp(m - tl.max(m, 0))  # empty splits: l = 0 and exp(-inf) = 0
    o = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :],
                mask=s_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + n * stride_on + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def decode_attention(q, k_blocks, v_blocks, block_tables, context_lens, scale: float,
                     max_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """q [N, H, D] attends over paged k/v_blocks [num_blocks, B, n_kv, D] (same strides) -> [N, H, D].

    Every row needs context_lens >= 1. max_len saves a host sync when the caller knows it;
    num_splits forces the split count (tests), otherwise it is chosen to fill the GPU.
    """
    n, num_heads, head_dim = q.shape
    _, block_size, n_kv, _ = k_blocks.shape
    assert k_blocks.stride() == v_blocks.stride() and k_blocks.stride(-1) == 1
    group = num_heads // n_kv
    out = torch.empty_like(q)
    if n == 0:
        return out
    q, block_tables = last_dim_contiguous(q), last_dim_contiguous(block_tables)
    if max_len is None:
        max_len = int(context_lens.max())
    split_len, splits = split_plan(max_len, n * n_kv, BLOCK_T, num_splits)
    if splits > 1:
        part_out = torch.empty(n, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(n, num_heads, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out  # unused
    _decode_split_kernel[(n, n_kv, splits)](
        q, k_blocks, v_blocks, block_tables, context_lens, out, part_out, part_m, part_l,
        scale, split_len, splits, num_heads,
        q.stride(0), q.stride(1), k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GROUP_P=pow2(group), DIM_P=pow2(head_dim),
        BLOCK_T=BLOCK_T, SPLIT=splits > 1, DOT_PRECISION=dot_precision(k_blocks.dtype))
    if splits > 1:
        _merge_splits_kernel[(n, num_heads)](
            part_out, part_m, part_l, out, splits, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, DIM_P=pow2(head_dim, 1), SPLITS_P=pow2(splits, 1))
    return out


def paged_decode_attention(q, kv_cache, block_tables, context_lens, scale: float, num_splits: int | None = None,
                           max_len: int | None = None):
    """One query token per row: q [N, H, D] over kv_cache [num_blocks, 2, B, n_kv, D] -> [N, H, D].
    max_len: the longest context, where the caller knows it on the host (else a device sync reads it)."""
    return decode_attention(q, kv_cache[:, 0], kv_cache[:, 1], block_tables, context_lens, scale,
                            max_len=max_len, num_splits=num_splits)
