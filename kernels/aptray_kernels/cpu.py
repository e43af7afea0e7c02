"""Faster CPU versions of the decode ops: batched matmuls and SDPA instead of einsum permutes.

Same results as reference.py on finite cache contents (aptray's pool is zero-initialised and
only ever holds written values), without the reference's masking copies of V and x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .cpu_mirror import additive_mask, buckets
from .reference import _context_mask, gather_kv, project_kv


def write_kv(kv_cache, k, v, slots):
    """index_copy_ into a row view of the pool: one memcpy per token instead of an index_put."""
    if not kv_cache.is_contiguous():
        return reference.write_kv(kv_cache, k, v, slots)
    num_blocks, _, block_size = kv_cache.shape[:3]
    rows = kv_cache.view(num_blocks * 2 * block_size, -1)
    k_rows = (slots // block_size) * (2 * block_size) + slots % block_size  # V rows follow K by one block
    rows.index_copy_(0, k_rows, k.reshape(len(slots), -1).to(rows.dtype))
    rows.index_copy_(0, k_rows + block_size, v.reshape(len(slots), -1).to(rows.dtype))


def gather_hidden(hidden_cache, block_tables, max_len):
    """reference.gather_hidden as one index_select of the rows' first blocks (whole blocks copied)."""
    n = block_tables.shape[0]
    num_blocks = -(-max_len // hidden_cache.shape[1])
    x = hidden_cache.index_select(0, block_tables[:, :num_blocks].reshape(-1))
    return x.view(n, -1, hidden_cache.shape[-1])[:, :max_len]


def _sdpa_decode(q, k, v, mask, scale):
    """q [N, H, D]; k, v [N, L, n_kv, D]; mask [N, L]."""
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[2])
    return out[:, :, 0, :]


def _decode_buckets(block_tables, context_lens, block_size, dtype, step_cache):
    """Per bucket: (rows or None for all, flat block ids, additive mask or None, length, blocks).
    Built once per step and shared by every layer through step_cache."""
    key = ("paged_decode", block_size, dtype)
    if step_cache is not None and key in step_cache:
        return step_cache[key]
    lens = context_lens.tolist()
    groups = buckets(lens, block_size)
    out = []
    for rows in groups:
        max_len = max(lens[i] for i in rows)
        num_blocks = -(-max_len // block_size)
        rows_t = None if len(groups) == 1 else torch.tensor(rows, device=block_tables.device)
        table = block_tables if rows_t is None else block_tables[rows_t]
        ids = table[:, :num_blocks].reshape(-1)
        sub = context_lens if rows_t is None else context_lens[rows_t]
        out.append((rows_t, ids, additive_mask(sub, max_len, dtype), max_len, num_blocks))
    if step_cache is not None:
        step_cache[key] = out
    return out


def _attend_buckets(q, parts, scale):
    """SDPA of each bucket's rows over its K, V [m, L, n_kv, D] (strided views are fine); GQA inside SDPA."""
    out = None if len(parts) == 1 else torch.empty_like(q)
    for rows, k, v, mask in parts:
        qq = q if rows is None else q[rows]
        o = F.scaled_dot_product_attention(qq[:, :, None, :], k.transpose(1, 2).to(q.dtype),
                                           v.transpose(1, 2).to(q.dtype), attn_mask=mask, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[2])[:, :, 0, :]
        if out is None:
            return o
        out[rows] = o
    return out


def paged_decode_attention(q, kv_cache, block_tables, context_lens, scale, step_cache=None):
    """K and V of each bucket gathered with one index_select each (a contiguous copy of whole blocks,
    no second copy to split K from V), or kept from last step by the step's KV DecodeMirror."""
    mirror = step_cache.get("kv_mirror") if step_cache is not None else None
    got = mirror.gathered(kv_cache, block_tables, context_lens, q.dtype, step_cache) if mirror is not None else None
    if got is not None:
        return _attend_buckets(q, [(rows, k[:, :n], v[:, :n], mask) for rows, (k, v), mask, n in got], scale)
    if not kv_cache.is_contiguous():
        max_len = int(context_lens.max())
        k, v = gather_kv(kv_cache, block_tables, max_len)
        return _sdpa_decode(q, k.to(q.dtype), v.to(q.dtype), _context_mask(context_lens, max_len), scale)
    num_blocks_total, _, block_size, n_kv, head_dim = kv_cache.shape
    flat = kv_cache.view(num_blocks_total, 2, -1)
    parts = []
    for rows, ids, mask, max_len, num_blocks in _decode_buckets(block_tables, context_lens, block_size, q.dtype,
                                                                step_cache):
        m = len(context_lens) if rows is None else len(rows)
        k, v = (flat[:, i].index_select(0, ids).view(m, num_blocks * block_size, n_kv, head_dim)[:, :max_len]
                for i in (0, 1))
        parts.append((rows, k, v, mask))
    return _attend_buckets(q, parts, scale)


def _through_heads(x, w):
    """x [N, H, a] times each KV head's matrix w [n_kv, a, b] (its query group shares it): [N, H, b].
    One bmm batched over KV heads: a broadcast matmul over [N, n_kv] copied the weights once per row."""
    n, num_heads, a = x.shape
    n_kv, _, b = w.shape
    group = num_heads // n_kv
    xs = x.view(n, n_kv, group, a).permute(1, 0, 2, 3).reshape(n_kv, n * group, a)
    return torch.bmm(xs, w).view(n_kv, n, group, b).permute(1, 0, 2, 3).reshape(n, num_heads, b)


def absorbed_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, w_v, b_v, scale, step_cache=None):
    """u_h = W_k,h^T q_h once per row; scores and weighted sums over the stored hidden vectors, by
    length bucket, from the step's hidden DecodeMirror when it has them (else one gather)."""
    n, num_heads, head_dim = q.shape
    d = hidden_cache.shape[-1]
    n_kv = w_k.shape[0] // head_dim
    u = _through_heads(q, w_k.view(n_kv, head_dim, d))  # [N, H, d]
    mirror = step_cache.get("hidden_mirror") if step_cache is not None else None
    got = (mirror.gathered(hidden_cache, block_tables, context_lens, q.dtype, step_cache)
           if mirror is not None else None)
    if got is None:
        max_len = int(context_lens.max())
        got = [(None, (gather_hidden(hidden_cache, block_tables, max_len),),
                additive_mask(context_lens, max_len, q.dtype), max_len)]
    y = None if len(got) == 1 else torch.empty(n, num_heads, d, dtype=q.dtype, device=q.device)
    for rows, (buf,), mask, max_len in got:
        x = buf[:, :max_len].to(q.dtype)  # [m, L, d]
        scores = torch.bmm(u if rows is None else u[rows], x.transpose(1, 2)) * scale  # [m, H, L]
        if mask is not None:
            scores += mask.view(len(x), 1, max_len)
        part = torch.bmm(torch.softmax(scores.float(), dim=-1).to(x.dtype), x)  # [m, H, d]
        if y is None:
            y = part
        else:
            y[rows] = part
    out = _through_heads(y, w_v.view(n_kv, head_dim, d).transpose(1, 2))  # [N, H, D]
    if b_v is not None:
        out = out + b_v.view(n_kv, 1, head_dim).expand(n_kv, num_heads // n_kv, head_dim).reshape(num_heads, head_dim)
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
    "gather_hidden": gather_hidden,
    "paged_decode_attention": paged_decode_attention,
    "absorbed_decode_attention": absorbed_decode_attention,
    "recompute_decode_attention": recompute_decode_attention,
}
