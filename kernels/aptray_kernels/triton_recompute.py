"""Recompute path: one Triton kernel gathers hidden vectors from the paged cache, projects K and V and
applies rotary; the paged decode kernel then attends over the result (scratch sized per call).

The same kernel converts a hidden request to KV (gather_project_kv == reference.project_kv of gather_hidden).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import cdiv, dot_precision, last_dim_contiguous, pow2
from .triton_paged_attention import decode_attention

BLOCK_T = 32   # positions per program
BLOCK_D = 64   # hidden channels per step of the projection
SCRATCH_BLOCK = 16  # the scratch K/V is read back as a paged cache with this block size


@triton.jit
def _gather_project_kv_kernel(cache_ptr, block_tables_ptr, context_lens_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                              cos_ptr, sin_ptr, out_ptr, width, max_len,
                              stride_cb, stride_ct, stride_btn, stride_wk, stride_wv, stride_cos,
                              stride_okv, stride_on, stride_ot, stride_oh,
                              HEAD_DIM: tl.constexpr, HALF_P: tl.constexpr, DIM_P: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                              HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, ROTARY: tl.constexpr,
                              ONLY_CONTEXT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program per (row, tile of positions, kv head). K is built as two halves so the neox rotary
    # (rotate halves) is elementwise: k_lo' = k_lo cos - k_hi sin, k_hi' = k_hi cos + k_lo sin.
    n = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(2)
    half: tl.constexpr = HEAD_DIM // 2
    limit = max_len
    if ONLY_CONTEXT:
        limit = tl.load(context_lens_ptr + n).to(tl.int32)
    ok = pos < limit
    blk = tl.load(block_tables_ptr + n * stride_btn + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    tok = blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct
    jh = tl.arange(0, HALF_P)
    jd = tl.arange(0, DIM_P)
    jh_ok = jh < half
    jd_ok = jd < HEAD_DIM
    k_lo = tl.zeros([BLOCK_T, HALF_P], tl.float32)
    k_hi = tl.zeros([BLOCK_T, HALF_P], tl.float32)
    v = tl.zeros([BLOCK_T, DIM_P], tl.float32)
    if tl.program_id(1) * BLOCK_T < limit:
        for c0 in range(0, width, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < width
            x = tl.load(cache_ptr + tok[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            # W^T tiles [BLOCK_D, D]: row h*D + j of W is output channel j of kv head h.
            wk_rows = wk_ptr + (h * HEAD_DIM + jh)[None, :] * stride_wk + cols[:, None]
            wh_ok = col_ok[:, None] & jh_ok[None, :]
            k_lo += tl.dot(x, tl.load(wk_rows, mask=wh_ok, other=0.0), input_precision=DOT_PRECISION)
            k_hi += tl.dot(x, tl.load(wk_rows + half * stride_wk, mask=wh_ok, other=0.0),
                           input_precision=DOT_PRECISION)
            wv = tl.load(wv_ptr + (h * HEAD_DIM + jd)[None, :] * stride_wv + cols[:, None],
                         mask=col_ok[:, None] & jd_ok[None, :], other=0.0)
            v += tl.dot(x, wv, input_precision=DOT_PRECISION)
    if HAS_BK:
        k_lo += tl.load(bk_ptr + h * HEAD_DIM + jh, mask=jh_ok, other=0.0).to(tl.float32)[None, :]
        k_hi += tl.load(bk_ptr + h * HEAD_DIM + half + jh, mask=jh_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BV:
        v += tl.load(bv_ptr + h * HEAD_DIM + jd, mask=jd_ok, other=0.0).to(tl.float32)[None, :]
    if ROTARY:
        # The reference rounds K to the cache dtype before rotating; do the same so results match.
        k_lo = k_lo.to(out_ptr.dtype.element_ty).to(tl.float32)
        k_hi = k_hi.to(out_ptr.dtype.element_ty).to(tl.float32)
        rot_ok = ok[:, None] & jh_ok[None, :]
        c = tl.load(cos_ptr + pos[:, None] * stride_cos + jh[None, :], mask=rot_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos[:, None] * stride_cos + jh[None, :], mask=rot_ok, other=0.0).to(tl.float32)
        k_lo, k_hi = k_lo * c - k_hi * s, k_hi * c + k_lo * s
    dst = out_ptr + n * stride_on + pos[:, None].to(tl.int64) * stride_ot + h * stride_oh
    st_half = ok[:, None] & jh_ok[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst + jh[None, :], k_lo.to(ty), mask=st_half)
    tl.store(dst + half + jh[None, :], k_hi.to(ty), mask=st_half)
    tl.store(dst + stride_okv + jd[None, :], v.to(ty), mask=ok[:, None] & jd_ok[None, :])


def _gather_project(hidden_cache, block_tables, context_lens, max_len, w_k, b_k, w_v, b_v, n_kv, head_dim,
                    cos, sin, only_context: bool) -> torch.Tensor:
    """Dense scratch [2, N, L_pad, n_kv, D] (0 = K, 1 = V) with L_pad a multiple of SCRATCH_BLOCK."""
    n = block_tables.shape[0]
    width = hidden_cache.shape[-1]
    assert head_dim % 2 == 0 and hidden_cache.stride(-1) == 1
    padded = cdiv(max(max_len, 1), SCRATCH_BLOCK) * SCRATCH_BLOCK
    out = torch.empty(2, n, padded, n_kv, head_dim, dtype=hidden_cache.dtype, device=hidden_cache.device)
    if n == 0 or max_len == 0:
        return out
    block_tables = last_dim_contiguous(block_tables)
    w_k, w_v = last_dim_contiguous(w_k), last_dim_contiguous(w_v)
    rotary = cos is not None
    if rotary:
        cos, sin = last_dim_contiguous(cos), last_dim_contiguous(sin)
        assert cos.stride() == sin.stride() and cos.shape[0] >= max_len
    _gather_project_kv_kernel[(n, cdiv(max_len, BLOCK_T), n_kv)](
        hidden_cache, block_tables, context_lens, w_k, b_k if b_k is not None else w_k, w_v,
        b_v if b_v is not None else w_v, cos if rotary else w_k, sin if rotary else w_k, out, width, max_len,
        hidden_cache.stride(0), hidden_cache.stride(1), block_tables.stride(0), w_k.stride(0), w_v.stride(0),
        cos.stride(0) if rotary else 0, out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        HEAD_DIM=head_dim, HALF_P=pow2(head_dim // 2), DIM_P=pow2(head_dim), BLOCK_SIZE=hidden_cache.shape[1],
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, HAS_BK=b_k is not None, HAS_BV=b_v is not None, ROTARY=rotary,
        ONLY_CONTEXT=only_context, DOT_PRECISION=dot_precision(hidden_cache.dtype))
    return out


def gather_project_kv(hidden_cache, block_tables, max_len: int, w_k, b_k, w_v, b_v, n_kv: int, head_dim: int,
                      cos=None, sin=None):
    """K, V [N, max_len, n_kv, D] == reference.project_kv(reference.gather_hidden(...)) (hidden -> KV)."""
    kv = _gather_project(hidden_cache, block_tables, None, max_len, w_k, b_k, w_v, b_v, n_kv, head_dim,
                         cos, sin, only_context=False)
    return kv[0, :, :max_len], kv[1, :, :max_len]


def recompute_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, b_k, w_v, b_v, scale: float,
                               cos=None, sin=None, num_splits: int | None = None, max_len: int | None = None):
    """Same contract as reference.recompute_decode_attention; K/V scratch lives only for this call.
    max_len: the longest context, where the caller knows it on the host (else a device sync reads it)."""
    n, _, head_dim = q.shape
    n_kv = w_k.shape[0] // head_dim
    if max_len is None:
        max_len = int(context_lens.max())
    kv = _gather_project(hidden_cache, block_tables, context_lens, max_len, w_k, b_k, w_v, b_v, n_kv, head_dim,
                         cos, sin, only_context=True)
    blocks_per_row = kv.shape[2] // SCRATCH_BLOCK
    k_blocks = kv[0].view(n * blocks_per_row, SCRATCH_BLOCK, n_kv, head_dim)
    v_blocks = kv[1].view(n * blocks_per_row, SCRATCH_BLOCK, n_kv, head_dim)
    tables = torch.arange(n * blocks_per_row, device=q.device).view(n, blocks_per_row)
    return decode_attention(q, k_blocks, v_blocks, tables, context_lens, scale, max_len=max_len,
                            num_splits=num_splits)
