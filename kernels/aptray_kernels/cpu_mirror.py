"""DecodeMirror: a CPU decode row's gathered cache, kept from one step to the next.

Gathering every decode row's context out of the paged pool copies all of it, per layer, per step;
on a CPU that copy costs as much as the attention that reads it. While the same requests decode
step after step (same order, each context one longer, block tables only growing), a layer appends
the newest token's rows (read back from the pool) to last step's buffers instead. A step whose
decode set changed gathers plainly; the next one, if the set held, rebuilds from the pool with room
for as many steps as sets have been holding (a running mean) or as this one has held, at most
HEADROOM_TOKENS, and a bucket that outgrows its room rebuilds again. Under continuous batching the
set changes every step or two, where a fixed room of 64 tokens would gather a short context's blocks
several times over (`python -m loadgen.bench_engine churn`). The buffers always hold
exactly the pool's values, so results equal the plain gather. Memory is bounded by budget_bytes
(past it the caller gathers as before).

One mirror per cache kind: KV blocks hold two planes (K then V, block_size rows each), hidden
blocks one (hidden_block_size rows of d).
"""
from __future__ import annotations

import math

import torch

from .reference import _context_mask

# Fixed cost of one more decode bucket (two gathers, one SDPA call, one scatter of rows), in
# context tokens of gather + attention work it must save to pay off (measured on 2 CPU cores).
BUCKET_COST_TOKENS = 512
MAX_BUCKETS = 4


def buckets(lens: list[int], block_size: int) -> list[list[int]]:
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


def additive_mask(context_lens: torch.Tensor, max_len: int, dtype) -> torch.Tensor | None:
    """[N, 1, 1, max_len] of 0 / -inf past each row's length; None when every row is max_len long."""
    if int(context_lens.min()) == max_len:
        return None
    mask = torch.zeros(len(context_lens), 1, 1, max_len, dtype=dtype, device=context_lens.device)
    return mask.masked_fill_(~_context_mask(context_lens, max_len)[:, None, None, :], float("-inf"))


def geometry(cache: torch.Tensor, planes: int) -> tuple[int, int, tuple[int, ...]]:
    """(num_blocks, rows per plane of a block, shape of one row) of a KV ([B, 2, bs, n_kv, D]) or a
    hidden ([B, hbs, d]) cache view."""
    if planes == 2:
        return cache.shape[0], cache.shape[2], tuple(cache.shape[3:])
    return cache.shape[0], cache.shape[1], tuple(cache.shape[2:])


class DecodeMirror:
    HEADROOM_TOKENS = 64

    def __init__(self, num_layers: int, budget_bytes: int, planes: int = 2):
        self.num_layers = num_layers
        self.budget_bytes = budget_bytes
        self.planes = planes  # 2: a KV block's K and V; 1: a hidden block
        self.prev = None  # last step's [(request_id, context_len, block_table)]
        self.reuse = False
        self.held = 0  # steps the decode set has held
        self.mean_held = 8.0  # how many steps a set holds, a running mean
        self.epoch = 0
        self.plan = None  # [(rows tensor or None for all, rows, cap_blocks)] of the current epoch
        self.layers = {}  # cache data_ptr -> (epoch, [tuple of per-plane buffers])

    def begin_step(self, decode_seqs: list) -> None:
        """decode_seqs: this step's decode rows of this kind, in order, as (request_id, context_len, block_table)."""
        prev, self.prev = self.prev, decode_seqs
        self.reuse = prev is not None and len(prev) == len(decode_seqs) and all(
            a[0] == b[0] and b[1] == a[1] + 1 and b[2][:len(a[2])] == a[2] for a, b in zip(prev, decode_seqs))
        if self.reuse:
            self.held += 1
        else:
            if prev:  # a set ended: how long it held
                self.mean_held = 0.5 * self.mean_held + 0.5 * self.held
            self.held = 0

    def _step_plan(self, cache, block_tables, context_lens, dtype, step_cache):
        """Once per step: keep the epoch's buckets (reuse) or start a new epoch; None when over budget."""
        _, block_size, row_shape = geometry(cache, self.planes)
        key = ("decode_mirror", self.planes, block_size, dtype)
        if key in step_cache:
            return step_cache[key]
        if not self.reuse:  # the decode set changed: this step gathers plainly
            self.plan = step_cache[key] = None
            return None
        lens = context_lens.tolist()
        device = block_tables.device
        if not (self.plan is not None
                and all(max(lens[i] for i in rows) <= cap * block_size for _, rows, cap in self.plan)):
            self.epoch += 1
            groups = buckets(lens, block_size)
            self.plan = []
            # room for as many steps as a set holds, or as this one has held already
            headroom = min(self.HEADROOM_TOKENS, max(1, math.ceil(self.mean_held), self.held))
            for rows in groups:
                max_len = max(lens[i] for i in rows) + headroom
                rows_t = None if len(groups) == 1 else torch.tensor(rows, device=device)
                self.plan.append((rows_t, rows, -(-max_len // block_size)))
            per_token = self.planes * math.prod(row_shape) * cache.element_size() * self.num_layers
            tokens = sum(len(rows) * cap * block_size for _, rows, cap in self.plan)
            if tokens * per_token > self.budget_bytes:
                self.plan = None
                step_cache[key] = None
                return None
        out = []
        stride = self.planes * block_size  # rows of one block in the pool's row view
        for rows_t, _, cap in self.plan:
            table = block_tables if rows_t is None else block_tables[rows_t]
            sub = context_lens if rows_t is None else context_lens[rows_t]
            max_len, m = int(sub.max()), len(sub)
            ids = torch.zeros(m, cap, dtype=table.dtype, device=device)  # headroom reads block 0: masked
            width = min(cap, table.shape[1])
            ids[:, :width] = table[:, :width]
            pos = sub - 1  # the newest token of each row
            slot = table.gather(1, (pos // block_size)[:, None])[:, 0] * block_size + pos % block_size
            src = (slot // block_size) * stride + slot % block_size  # plane 0's row in the pool's row view
            dst = torch.arange(m, device=device) * (cap * block_size) + pos
            out.append((rows_t, cap, ids.reshape(-1), src, dst, additive_mask(sub, max_len, dtype), max_len, m))
        step_cache[key] = out
        return out

    def gathered(self, cache, block_tables, context_lens, dtype, step_cache):
        """Per bucket: (rows tensor or None for all rows, per-plane buffers [m, cap * bs, *row] whose
        first max_len rows are the context, additive mask [m, 1, 1, max_len] or None, max_len);
        None when the buffers would pass the budget or the cache is not one contiguous pool."""
        if not cache.is_contiguous():
            return None
        plan = self._step_plan(cache, block_tables, context_lens, dtype, step_cache)
        if plan is None:
            return None
        num_blocks, block_size, row_shape = geometry(cache, self.planes)
        flat = cache.view(num_blocks, self.planes, -1)
        rows_view = cache.view(num_blocks * self.planes * block_size, -1)
        key = cache.data_ptr()
        epoch, bufs = self.layers.get(key, (None, None))
        if epoch != self.epoch:  # gather whole blocks from the pool, headroom included
            bufs = [tuple(flat[:, p].index_select(0, ids).view(m, cap * block_size, *row_shape)
                          for p in range(self.planes))
                    for _, cap, ids, _, _, _, _, m in plan]
            self.layers[key] = (self.epoch, bufs)
        else:  # append this step's token, already written to the pool
            for planes, (_, _, _, src, dst, _, _, _) in zip(bufs, plan):
                for p, buf in enumerate(planes):
                    new_rows = rows_view.index_select(0, src + p * block_size)
                    buf.view(-1, rows_view.shape[1]).index_copy_(0, dst, new_rows)
        return [(rows_t, planes, mask, max_len) for planes, (rows_t, _, _, _, _, mask, max_len, _) in zip(bufs, plan)]
