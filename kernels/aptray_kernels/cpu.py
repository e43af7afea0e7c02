"""Faster CPU versions of the decode ops: batched matmuls and SDPA instead of einsum permutes.

Same results as reference.py on finite cache contents (aptray's pool is zero-initialised and
only ever holds written values), without the reference's masking copies of V and x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .reference import _context_mask, gather_hidden, gather_kv, project_kv


def write_kv(kv_cache, k, v, slots):
    """index_copy_ into a row view of the pool: one memcpy per token instead of an index_put."""
    if not kv_cache.is_contiguous():
        return reference.write_kv(kv_cache, k, v, slots)
    num_blocks, _, block_size = kv_cache.shape[:3]
    rows = kv_cache.view(num_blocks * 2 * block_size, -1)
    k_rows = (slots // block_size) * (2 * block_size) + slots % block_size  # V rows follow K by one block
    rows.index_copy_(0, k_rows, k.reshape(len(slots), -1).to(rows.dtype))
    rows.index_copy_(0, k_rows + block_size, v.reshape(len(slots), -1).to(rows.dtype))


def _sdpa_decode(q, k, v, mask, scale):
    """q [N, H, D]; k, v [N, L, n_kv, D]; mask [N, L]."""
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[2])
    return out[:, :, 0, :]


def paged_decode_attention(q, kv_cache, block_tables, context_lens, scale):
    max_len = int(context_lens.max())
    k, v = gather_kv(kv_cache, block_tables, max_len)
    return _sdpa_decode(q, k.to(q.dtype), v.to(q.dtype), _context_mask(context_lens, max_len), scale)


def absorbed_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, w_v, b_v, scale):
    n, num_heads, head_dim = q.shape
    d = hidden_cache.shape[-1]
    n_kv = w_k.shape[0] // head_dim
    max_len = int(context_lens.max())
    x = gather_hidden(hidden_cache, block_tables, max_len).to(q.dtype)  # [N, L, d]
    group = num_heads // n_kv
    # u_h = W_k,h^T q_h for every head at once: [N, H, d]
    u = torch.matmul(q.view(n, n_kv, group, head_dim), w_k.view(n_kv, head_dim, d)).view(n, num_heads, d)
    scores = torch.bmm(u, x.transpose(1, 2)) * scale  # [N, H, L]
    scores = scores.masked_fill(~_context_mask(context_lens, max_len)[:, None, :], float("-inf"))
    y = torch.bmm(torch.softmax(scores.float(), dim=-1).to(x.dtype), x)  # [N, H, d]
    out = torch.matmul(y.view(n, n_kv, group, d), w_v.view(n_kv, head_dim, d).transpose(1, 2))
    out = out.reshape(n, num_heads, head_dim)
    if b_v is not None:
        out = out + b_v.view(n_kv, 1, head_dim).expand(n_kv, group, head_dim).reshape(num_heads, head_dim)
    return out


def recompute_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, b_k, w_v, b_v, scale,
                               cos=None, sin=None):
    head_dim = q.shape[-1]
    max_len = int(context_lens.max())
    x = gather_hidden(hidden_cache, block_tables, max_len)
    k, v = project_kv(x, w_k, b_k, w_v, b_v, w_k.shape[0] // head_dim, head_dim, cos, sin)
    return _sdpa_decode(q, k, v, _context_mask(context_lens, max_len), scale)


KERNELS = {
    "write_kv": write_kv,
    "paged_decode_attention": paged_decode_attention,
    "absorbed_decode_attention": absorbed_decode_attention,
    "recompute_decode_attention": recompute_decode_attention,
}
