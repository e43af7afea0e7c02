"""Faster CPU versions of the decode ops: batched matmuls and SDPA instead of einsum permutes.

Same results as reference.py on finite cache contents (aptray's pool is zero-initialised and
only ever holds written values), without the reference's masking copies of V and x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
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


# Fixed cost of one more decode bucket (two gathers, one SDPA call, one scatter of rows), in
# context tokens of gather + attention work it must save to pay off (measured on 2 CPU cores).
BUCKET_COST_TOKENS = 512
MAX_BUCKETS = 4


def _buckets(lens: list[int], block_size: int) -> list[list[int]]:
    """Rows split into at most MAX_BUCKETS groups of similar context length, when the padding saved
    (every row of a group is padded to its longest) outweighs the cost of an extra group."""
    n = len(lens)
    order = sorted(range(n), key=lens.__getitem__)
    padded = [-(-lens[i] // block_size) * block_size for i in order]
    best, best_cost = 1, n * padded[-1]
    for k in range(2, min(MAX_BUCKETS, n) + 1):
        ends = [round(n * (j + 1) / k) for j in range(k)]
        cost = sum((e - s) * padded[e - 1] for s, e in zip([0] + ends[:-1], ends)) + (k - 1) * BUCKET_COST_TOKENS
        if cost < best_cost:
            best, best_cost = k, cost
    if best == 1:
        return [list(range(n))]
    ends = [round(n * (j + 1) / best) for j in range(best)]
    return [order[s:e] for s, e in zip([0] + ends[:-1], ends)]


def _decode_buckets(block_tables, context_lens, block_size, dtype, step_cache):
    """Per bucket: (rows or None for all, flat block ids, additive mask or None, length, blocks).
    Built once per step and shared by every layer through step_cache."""
    key = ("paged_decode", block_size, dtype)
    if step_cache is not None and key in step_cache:
        return step_cache[key]
    lens = context_lens.tolist()
    groups = _buckets(lens, block_size)
    out = []
    for rows in groups:
        max_len = max(lens[i] for i in rows)
        num_blocks = -(-max_len // block_size)
        rows_t = None if len(groups) == 1 else torch.tensor(rows, device=block_tables.device)
        table = block_tables if rows_t is None else block_tables[rows_t]
        ids = table[:, :num_blocks].reshape(-1)
        sub = context_lens if rows_t is None else context_lens[rows_t]
        mask = None
        if min(lens[i] for i in rows) < max_len:  # additive mask, built once instead of per layer
            mask = torch.zeros(len(rows), 1, 1, max_len, dtype=dtype, device=block_tables.device)
            mask.masked_fill_(~_context_mask(sub, max_len)[:, None, None, :], float("-inf"))
        out.append((rows_t, ids, mask, max_len, num_blocks))
    if step_cache is not None:
        step_cache[key] = out
    return out


def paged_decode_attention(q, kv_cache, block_tables, context_lens, scale, step_cache=None):
    """K and V of each bucket gathered with one index_select each (a contiguous copy of whole blocks,
    no second copy to split K from V), SDPA reading them as strided views; GQA inside SDPA."""
    mirror = step_cache.get("kv_mirror") if step_cache is not None else None
    if mirror is not None and kv_cache.is_contiguous():
        out = mirror.attend(q, kv_cache, block_tables, context_lens, scale, step_cache)
        if out is not None:
            return out
    if not kv_cache.is_contiguous():
        max_len = int(context_lens.max())
        k, v = gather_kv(kv_cache, block_tables, max_len)
        return _sdpa_decode(q, k.to(q.dtype), v.to(q.dtype), _context_mask(context_lens, max_len), scale)
    n, num_heads, head_dim = q.shape
    num_blocks_total, _, block_size, n_kv, _ = kv_cache.shape
    flat = kv_cache.view(num_blocks_total, 2, -1)
    buckets = _decode_buckets(block_tables, context_lens, block_size, q.dtype, step_cache)
    out = None if len(buckets) == 1 else torch.empty_like(q)
    for rows, ids, mask, max_len, num_blocks in buckets:
        m = n if rows is None else len(rows)
        k = flat[:, 0].index_select(0, ids).view(m, num_blocks * block_size, n_kv, head_dim)[:, :max_len]
        v = flat[:, 1].index_select(0, ids).view(m, num_blocks * block_size, n_kv, head_dim)[:, :max_len]
        qq = q if rows is None else q[rows]
        o = F.scaled_dot_product_attention(qq[:, :, None, :], k.transpose(1, 2).to(q.dtype),
                                           v.transpose(1, 2).to(q.dtype), attn_mask=mask, scale=scale,
                                           enable_gqa=num_heads != n_kv)[:, :, 0, :]
        if out is None:
            return o
        out[rows] = o
    return out


class DecodeMirror:
    """Keeps each layer's gathered K/V of the KV decode rows from one step to the next (CPU).

    While the same requests decode step after step (same order, each context one longer, block
    tables only growing), a layer appends the newest token's K and V (read back from the pool) to
    last step's gathered buckets instead of gathering the whole context again. Any change of the
    decode set, or a bucket outgrowing its headroom, rebuilds from the pool: the buffers always hold
    exactly the pool's values, so results equal the plain gather. Its memory is bounded by
    budget_bytes (past it, the plain gather runs).
    """
    HEADROOM_TOKENS = 64

    def __init__(self, num_layers: int, budget_bytes: int):
        self.num_layers = num_layers
        self.budget_bytes = budget_bytes
        self.prev = None  # last step's [(request_id, context_len, block_table)]
        self.reuse = False
        self.epoch = 0
        self.plan = None  # [(rows tensor or None for all, rows, cap_blocks)] of the current epoch
        self.layers = {}  # kv_cache data_ptr -> (epoch, [(k_buf, v_buf)])

    def begin_step(self, decode_seqs: list) -> None:
        """decode_seqs: this step's KV decode rows in order, as (request_id, context_len, block_table)."""
        prev, self.prev = self.prev, decode_seqs
        self.reuse = prev is not None and len(prev) == len(decode_seqs) and all(
            a[0] == b[0] and b[1] == a[1] + 1 and b[2][:len(a[2])] == a[2] for a, b in zip(prev, decode_seqs))

    def _step_plan(self, kv_cache, block_tables, context_lens, dtype, step_cache):
        """Once per step: keep the epoch's buckets (reuse) or start a new epoch; None when over budget."""
        block_size = kv_cache.shape[2]
        key = ("decode_mirror", block_size, dtype)
        if key in step_cache:
            return step_cache[key]
        lens = context_lens.tolist()
        device = block_tables.device
        if not (self.reuse and self.plan is not None
                and all(max(lens[i] for i in rows) <= cap * block_size for _, rows, cap in self.plan)):
            self.epoch += 1
            groups = _buckets(lens, block_size)
            self.plan = []
            for rows in groups:
                max_len = max(lens[i] for i in rows) + self.HEADROOM_TOKENS
                rows_t = None if len(groups) == 1 else torch.tensor(rows, device=device)
                self.plan.append((rows_t, rows, -(-max_len // block_size)))
            per_token = 2 * kv_cache[0, 0, 0].numel() * kv_cache.element_size() * self.num_layers
            tokens = sum(len(rows) * cap * block_size for _, rows, cap in self.plan)
            if tokens * per_token > self.budget_bytes:
                self.plan = None
                step_cache[key] = None
                return None
        out = []
        for rows_t, _, cap in self.plan:
            table = block_tables if rows_t is None else block_tables[rows_t]
            sub = context_lens if rows_t is None else context_lens[rows_t]
            sub_list = sub.tolist()
            max_len, m = max(sub_list), len(sub_list)
            ids = torch.zeros(m, cap, dtype=table.dtype, device=device)  # headroom reads block 0: masked
            width = min(cap, table.shape[1])
            ids[:, :width] = table[:, :width]
            pos = sub - 1  # the newest token of each row
            slot = table.gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size
            src = (slot // block_size) * (2 * block_size) + slot % block_size  # K row in the pool's row view
            dst = torch.arange(m, device=device) * (cap * block_size) + pos
            mask = None
            if min(sub_list) < max_len:
                mask = torch.zeros(m, 1, 1, max_len, dtype=dtype, device=device)
                mask.masked_fill_(~_context_mask(sub, max_len)[:, None, None, :], float("-inf"))
            out.append((rows_t, cap, ids.reshape(-1), src, dst, mask, max_len, m))
        step_cache[key] = out
        return out

    def attend(self, q, kv_cache, block_tables, context_lens, scale, step_cache):
        n, num_heads, head_dim = q.shape
        num_blocks_total, _, block_size, n_kv, _ = kv_cache.shape
        plan = self._step_plan(kv_cache, block_tables, context_lens, q.dtype, step_cache)
        if plan is None:
            return None
        flat = kv_cache.view(num_blocks_total, 2, -1)
        rows_view = kv_cache.view(num_blocks_total * 2 * block_size, n_kv * head_dim)
        key = kv_cache.data_ptr()
        epoch, bufs = self.layers.get(key, (None, None))
        if epoch != self.epoch:  # gather whole blocks from the pool, headroom included
            bufs = [tuple(flat[:, i].index_select(0, ids).view(m, cap * block_size, n_kv, head_dim) for i in (0, 1))
                    for _, cap, ids, _, _, _, _, m in plan]
            self.layers[key] = (self.epoch, bufs)
        else:  # append this step's token, already written to the pool
            for (k_buf, v_buf), (_, _, _, src, dst, _, _, _) in zip(bufs, plan):
                k_buf.view(-1, n_kv * head_dim).index_copy_(0, dst, rows_view.index_select(0, src))
                v_buf.view(-1, n_kv * head_dim).index_copy_(0, dst, rows_view.index_select(0, src + block_size))
        out = None if len(plan) == 1 else torch.empty_like(q)
        for (k_buf, v_buf), (rows, _, _, _, _, mask, max_len, _) in zip(bufs, plan):
            qq = q if rows is None else q[rows]
            o = F.scaled_dot_product_attention(qq[:, :, None, :], k_buf[:, :max_len].transpose(1, 2).to(q.dtype),
                                               v_buf[:, :max_len].transpose(1, 2).to(q.dtype), attn_mask=mask,
                                               scale=scale, enable_gqa=num_heads != n_kv)[:, :, 0, :]
            if out is None:
                return o
            out[rows] = o
        return out


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
    "gather_hidden": gather_hidden,
    "paged_decode_attention": paged_decode_attention,
    "absorbed_decode_attention": absorbed_decode_attention,
    "recompute_decode_attention": recompute_decode_attention,
}
