"""Absorbed decode attention straight from the paged hidden cache (models without rotary, e.g. OPT).

u_h = W_k,h^T q_h and out_h = W_v,h y_h + b_v,h are small torch matmuls; the memory-bound middle runs in
Triton: scores_t = u_h . x_t over the paged hidden vectors, softmax, y_h = sum_t a_t x_t.
All H heads read the same x_t, so it is one multi-query attention with head dim d per row.

Two passes (scores, then weighted sum) read x twice. A one-pass kernel would need an [H, d] fp32
accumulator per program (800 KB for OPT-13B), which does not fit on chip, so the weighted sum is
split over d instead and the second read is often served from L2. See docs/KERNELS.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_common import cdiv, dot_precision, last_dim_contiguous, pow2, split_plan

MIN_SPLIT_TOKENS = 512  # each split writes an [H, d] fp32 partial: keep that small next to its x reads


@dataclass(frozen=True)
class Tiling:
    """How the two passes tile their work. block_t: tokens per tile; block_d: hidden channels per chunk;
    num_warps, num_stages: Triton's launch options (None: its defaults). Not tuned on a GPU yet: the GPU
    check times a grid of them (loadgen/gpu_check/bandwidth.py) against this default."""
    block_t: int = 32
    block_d: int = 128
    num_warps: int | None = None
    num_stages: int | None = None

    def launch(self) -> dict:
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages)) if v is not None}


DEFAULT_TILING = Tiling()


@triton.jit
def _hidden_scores_kernel(u_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, scores_ptr,
                          num_heads, width, max_len,
                          stride_un, stride_uh, stride_cb, stride_ct, stride_btn, stride_sn, stride_sh,
                          BLOCK_SIZE: tl.constexpr, HEADS_P: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program per (row, tile of positions): scores[h, t] = u_h . x_t, -inf past the row's length.
    n = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, HEADS_P)
    head_ok = heads < num_heads
    ctx = tl.load(context_lens_ptr + n).to(tl.int32)
    ok = pos < ctx
    blk = tl.load(block_tables_ptr + n * stride_btn + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    tok = blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct
    scores = tl.zeros([HEADS_P, BLOCK_T], tl.float32)
    if tl.program_id(1) * BLOCK_T < ctx:  # tiles wholly past the row's length read nothing
        for c0 in range(0, width, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < width
            x = tl.load(cache_ptr + tok[:, None] + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
            u = tl.load(u_ptr + n * stride_un + heads[:, None] * stride_uh + cols[None, :],
                        mask=head_ok[:, None] & col_ok[None, :], other=0.0)
            scores += tl.dot(u.to(x.dtype), tl.trans(x), input_precision=DOT_PRECISION)
    scores = tl.where(ok[None, :], scores, float("-inf"))
    tl.store(scores_ptr + n * stride_sn + heads[:, None] * stride_sh + pos[None, :], scores,
             mask=head_ok[:, None] & (pos < max_len)[None, :])


@triton.jit
def _hidden_weighted_sum_kernel(probs_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, y_ptr,
                                num_heads, width, split_len,
                                stride_pn, stride_ph, stride_cb, stride_ct, stride_btn,
                                stride_ys, stride_yn, stride_yh,
                                BLOCK_SIZE: tl.constexpr, HEADS_P: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # One program per (row, chunk of d, context split): y[h, chunk] = sum_t a[h, t] x_t[chunk].
    n = tl.program_id(0).to(tl.int64)  # row offsets can pass 2**31 elements
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2)
    col_ok = cols < width
    heads = tl.arange(0, HEADS_P)
    head_ok = heads < num_heads
    ctx = tl.load(context_lens_ptr + n).to(tl.int32)
    start = s * split_len
    end = tl.minimum(start + split_len, ctx)
    acc = tl.zeros([HEADS_P, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        ok = pos < end
        blk = tl.load(block_tables_ptr + n * stride_btn + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        x = tl.load(cache_ptr + (blk * stride_cb + (pos % BLOCK_SIZE) * stride_ct)[:, None] + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :], other=0.0)
        p = tl.load(probs_ptr + n * stride_pn + heads[:, None] * stride_ph + pos[None, :],
                    mask=head_ok[:, None] & ok[None, :], other=0.0)
        acc += tl.dot(p.to(x.dtype), x, input_precision=DOT_PRECISION)
    tl.store(y_ptr + s * stride_ys + n * stride_yn + heads[:, None] * stride_yh + cols[None, :], acc,
             mask=head_ok[:, None] & col_ok[None, :])


def hidden_attention(u, hidden_cache, block_tables, context_lens, max_len: int | None = None,
                     num_splits: int | None = None, tiling: Tiling = DEFAULT_TILING) -> torch.Tensor:
    """y [N, H, d] fp32 = softmax_t(u_h . x_t) weighted sum of x_t, for u [N, H, d] (scale folded in)."""
    block_t, block_d = tiling.block_t, tiling.block_d
    n, num_heads, width = u.shape
    block_size = hidden_cache.shape[1]
    assert hidden_cache.stride(-1) == 1
    u, block_tables = last_dim_contiguous(u), last_dim_contiguous(block_tables)
    if max_len is None:
        max_len = int(context_lens.max())
    heads_p, precision = pow2(num_heads), dot_precision(hidden_cache.dtype)
    scores = torch.empty(n, num_heads, max_len, dtype=torch.float32, device=u.device)
    _hidden_scores_kernel[(n, cdiv(max_len, block_t))](
        u, hidden_cache, block_tables, context_lens, scores, num_heads, width, max_len,
        u.stride(0), u.stride(1), hidden_cache.stride(0), hidden_cache.stride(1), block_tables.stride(0),
        scores.stride(0), scores.stride(1),
        BLOCK_SIZE=block_size, HEADS_P=heads_p, BLOCK_T=block_t, BLOCK_D=block_d, DOT_PRECISION=precision,
        **tiling.launch())
    probs = torch.softmax(scores, dim=-1)  # H*ctx fp32 values per row: small next to ctx*d hidden values
    d_chunks = cdiv(width, block_d)
    if num_splits is None:
        num_splits = min(split_plan(max_len, n * d_chunks, block_t)[1], cdiv(max_len, MIN_SPLIT_TOKENS))
    split_len, splits = split_plan(max_len, n * d_chunks, block_t, num_splits)
    y = torch.empty(splits, n, num_heads, width, dtype=torch.float32, device=u.device)
    _hidden_weighted_sum_kernel[(n, d_chunks, splits)](
        probs, hidden_cache, block_tables, context_lens, y, num_heads, width, split_len,
        probs.stride(0), probs.stride(1), hidden_cache.stride(0), hidden_cache.stride(1), block_tables.stride(0),
        y.stride(0), y.stride(1), y.stride(2),
        BLOCK_SIZE=block_size, HEADS_P=heads_p, BLOCK_T=block_t, BLOCK_D=block_d, DOT_PRECISION=precision,
        **tiling.launch())
    return y[0] if splits == 1 else y.sum(0)


def absorbed_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, w_v, b_v, scale: float,
                              num_splits: int | None = None, max_len: int | None = None,
                              tiling: Tiling = DEFAULT_TILING):
    """Same contract as reference.absorbed_decode_attention: q [N, H, D]; w_k, w_v [n_kv * D, d]; b_v or None.
    max_len: the longest context, where the caller knows it on the host (else a device sync reads it)."""
    n, num_heads, head_dim = q.shape
    width = hidden_cache.shape[-1]
    n_kv = w_k.shape[0] // head_dim
    group = num_heads // n_kv
    # The weights stay in their own dtype (casting them per step would cost more than the attention).
    qg = q.to(w_k.dtype).view(n, n_kv, group, head_dim)
    u = torch.einsum("ngqe,ged->ngqd", qg, w_k.view(n_kv, head_dim, width)).float() * scale
    y = hidden_attention(u.reshape(n, num_heads, width), hidden_cache, block_tables, context_lens, max_len=max_len,
                         num_splits=num_splits, tiling=tiling)
    out = torch.einsum("ngqd,ged->ngqe", y.view(n, n_kv, group, width).to(w_v.dtype),
                       w_v.view(n_kv, head_dim, width)).float()
    if b_v is not None:
        out = out + b_v.float().view(1, n_kv, 1, head_dim)
    return out.reshape(n, num_heads, head_dim).to(q.dtype)
