"""Apt-Serve's adaptive scheduler (DESIGN section 3), with the fixes listed there.

Every iteration: pending times p_i and violators over the waiting set W and running set R;
U = |W| + |R| - violators; alpha from the online step-cost model; then a greedy by value per
block (aptray.scheduler.greedy) picks which requests run and as KV or hidden.

iteration_shape "alternate" (the paper): a prefill-only iteration when W's summed pending time
is at least R's (non-violators), else, or when nothing waiting fits, a decode-only iteration.
iteration_shape "mixed": every iteration decodes the running set that fits, then spends the
token budget left (sized for the TBT SLO) on chunked prefills, partial ones first.
"""
from __future__ import annotations

import numpy as np

from aptray.request import CacheKind, Request, RequestStatus
from aptray.scheduler.base import Scheduler
from aptray.scheduler.greedy import HIDDEN, KV, Budgets, Candidates, select
from aptray.scheduler.slo_state import SloState
from aptray.scheduler.step_cost import StepCostModel, tbt_token_budget

# Share of the running set's expected growth (blocks it will add before it ends) kept out of
# admission; 0 = admit while blocks are free (vLLM), and decoding preempts when they run out.
# Measured (docs/SCHEDULER.md): 0.5 and 1 cut preemptions to ~0 but lost attainment at every
# rate (held-back admissions miss TTFT), so it is off; lost requests absorb the preemptions.
GROWTH_RESERVE = 0.0


def pending_and_violators(reqs, now: float, lost=None) -> tuple[np.ndarray, np.ndarray]:
    """Pending times, and who is a violator: past its SLO now, or (given lost) lost for good."""
    pending = np.fromiter((now - (r.last_token_time if r.last_token_time is not None else r.arrival_time)
                           for r in reqs), float, len(reqs))
    slo = np.fromiter((r.tbt_slo if r.first_token_time is not None else r.ttft_slo for r in reqs),
                      float, len(reqs))
    viol = pending > slo
    if lost:
        viol |= np.fromiter((r.request_id in lost for r in reqs), bool, len(reqs))
    return pending, viol


class AptScheduler(Scheduler):
    chunks_long_prompts = True  # chunks whenever a prompt exceeds the step's token budget

    def __init__(self, config, blocks):
        super().__init__(config, blocks)
        self.cost = StepCostModel(blocks.block_size, blocks.hidden_block_size)
        self.hidden_on = config.cache_mode != "kv" and blocks.hidden_enabled
        self.kv_on = config.cache_mode != "hidden" or not blocks.hidden_enabled
        self.slo = SloState()
        self.growth_reserve = GROWTH_RESERVE

    @property
    def alpha(self) -> float:
        """Seconds of extra iteration time per hidden block (exported as a metric)."""
        return self.cost.alpha

    def observe(self, plan, result) -> None:
        self.cost.observe(plan, result.step_time)

    def update(self, plan, result, now):
        got = super().update(plan, result, now)
        for req in got:
            self.slo.on_token(req)
        return got

    def finish(self, req, status) -> None:
        super().finish(req, status)
        self.slo.on_finish(req)

    def _lost_now(self, now: float) -> set[str]:
        """Requests that cannot attain their SLO any more (TTFT passed without a token included)."""
        lost = set(self.slo.lost)
        lost.update(r.request_id for r in self.waiting if r.first_token_time is None and now - r.arrival_time > r.ttft_slo)
        return lost

    def _growth_reserve(self) -> int:
        """Blocks the attainable running requests are expected to add before they end."""
        if self.growth_reserve <= 0:
            return 0
        tables, total = self.blocks.tables, 0
        for r in self.running:
            if r.request_id in self.slo.lost:
                continue  # served last anyway: its growth may be taken back by preempting it
            kind = r.cache_kind or CacheKind.KV
            grow = self.blocks.blocks_for(r.num_tokens + self.slo.expected_remaining(r), kind)
            total += max(0, grow - len(tables.get(r.request_id, ())))
        return int(self.growth_reserve * total)

    # -- one iteration -----------------------------------------------------------------------
    def schedule(self, now: float):
        conversions = self._requested_conversions()
        self._now = now
        self._waiting_seen = list(self.waiting)
        self._lost = self._lost_now(now)
        w_p, w_v = pending_and_violators(self._waiting_seen, now, self._lost)
        self._waiting_pv = (w_p, w_v)
        r_p, r_v = pending_and_violators(self.running, now, self._lost)
        self._U = len(w_p) + len(r_p) - int(w_v.sum()) - int(r_v.sum())
        if self.config.iteration_shape == "mixed":
            seqs = self._mixed(r_p, r_v, conversions)
        else:
            seqs = self._alternate(w_p, w_v, r_p, r_v, conversions)
        if not seqs and not conversions and self.running:
            # every running request is mid-prefill with no block for its next chunk: free the
            # newest so the others can move (the policy must never stall)
            self._preempt(self.running[-1])
        return self._plan(seqs, conversions)

    def _alternate(self, w_p, w_v, r_p, r_v, conversions):
        prefilling = np.array([r.is_prefilling for r in self.running], bool)
        decode_ready = not prefilling.all()
        if self.waiting or prefilling.any():
            # mid-prefill running requests wait on a prefill iteration: they count on W's side
            waiting_wins = w_p[~w_v].sum() + r_p[~r_v & prefilling].sum() >= r_p[~r_v & ~prefilling].sum()
            if not decode_ready or waiting_wins:
                seqs = self._prefill(self.config.max_num_batched_tokens)
                if seqs:
                    self.stats["iterations_prefill"] += 1
                    return seqs
        if not self.running:
            return []
        self.stats["iterations_decode"] += 1
        return self._decode(r_p, r_v, conversions, self.config.max_num_batched_tokens)

    def _mixed(self, r_p, r_v, conversions):
        decodes = sum(1 for r in self.running if not r.is_prefilling)
        budget = self._tbt_budget(decodes)
        seqs = self._decode(r_p, r_v, conversions, budget) if self.running else []
        seqs += self._prefill(budget - sum(len(s.token_ids) for s in seqs))
        if seqs:
            self.stats["iterations_mixed"] += 1
        return seqs

    # -- the running set ---------------------------------------------------------------------
    def _decode(self, r_p, r_v, conversions, token_budget: int):
        """Keep the running requests that fit all blocks, best value per block first; convert
        or preempt the rest; plan one token for each kept request that is decoding."""
        running = list(self.running)
        tables, bs = self.blocks.tables, self.blocks.block_size
        hbs = self.blocks.hidden_block_size or bs
        held = np.fromiter((len(tables.get(r.request_id, ())) for r in running), np.int64, len(running))
        size = np.fromiter((r.num_tokens for r in running), np.int64, len(running))
        prefilling = np.fromiter((r.is_prefilling for r in running), bool, len(running))
        hidden = np.fromiter((r.cache_kind is CacheKind.HIDDEN for r in running), bool, len(running))
        # blocks held after this iteration: all its tokens when decoding, what it holds when
        # mid-prefill (its next chunk is admission's business)
        need = np.where(prefilling, np.maximum(held, 1), -(-size // np.where(hidden, hbs, bs)))
        value = np.where(r_v, 0.0, r_p)
        hidden_value = value  # running hidden requests stay hidden: alpha prices a choice they no longer have
        if int(need.sum()) <= self.blocks.num_blocks:
            kept = np.ones(len(running), bool)  # all fit: the greedy would keep every one
        else:
            cands = Candidates(value, np.where(hidden, 0, need), np.where(hidden, need, 0), hidden_value,
                               np.zeros(len(running), np.int64), r_v)
            sel = select(cands, Budgets(self.blocks.num_blocks, 1, max(self.config.max_num_seqs, len(running))))
            if sel.guard_used:
                self.stats["guard_used"] += 1
            kept = sel.kind != 0
        decoding = np.flatnonzero(kept & ~prefilling)
        room = self.blocks.num_blocks - int(need[kept].sum())
        tokens_left = token_budget - len(decoding)
        to_hidden = []
        for i in self._value_order(value, need, ~kept):
            req = running[i]
            m_h = -(-int(size[i]) // hbs) if self.hidden_on else 0
            if not hidden[i] and not prefilling[i] and 0 < m_h <= room and size[i] <= tokens_left:
                room -= m_h  # KV -> hidden makes it fit: re-prefill it as hidden, in place
                tokens_left -= int(size[i])
                self.blocks.free(req.request_id)
                to_hidden.append(req)
            else:
                self._preempt(req)

        for i in np.flatnonzero(kept & ~prefilling & (need > held)):
            assert self._try_allocate(running[i], int(size[i]))  # fits: the greedy counted it
        for req in to_hidden:
            self._rehome_as_hidden(req)
        if self.config.cache_mode == "hybrid" and self.alpha > 0:
            conversions.extend(self._upgrades_with_headroom())  # before the plans name the blocks
        seqs = [self._seq_plan(running[i], 1) for i in decoding]
        seqs += [self._seq_plan(req, req.num_tokens) for req in to_hidden]
        return seqs

    @staticmethod
    def _value_order(value, need, mask) -> list[int]:
        idx = np.flatnonzero(mask)
        return list(idx[np.lexsort((idx, -value[idx] / need[idx]))])

    def _rehome_as_hidden(self, req: Request) -> None:
        """KV -> hidden: the KV cache holds no layer inputs, so recompute them by a re-prefill."""
        req.cache_kind = None
        req.num_computed_tokens = 0
        self.blocks.ensure(req.request_id, CacheKind.HIDDEN, req.num_tokens)
        req.cache_kind = CacheKind.HIDDEN
        self.stats["conversions_to_hidden"] += 1

    def _upgrades_with_headroom(self):
        """Hidden -> KV (one projection) for the hidden requests costing most, while a block per
        running request stays free: only worth it when hidden steps cost time (alpha > 0)."""
        hidden = [r for r in self.running if r.cache_kind is CacheKind.HIDDEN and not r.is_prefilling
                  and r.num_computed_tokens > 0]
        if not hidden:
            return []
        hidden.sort(key=lambda r: -len(self.blocks.tables[r.request_id]))
        # keep the running set's expected growth free too, or the upgrade is undone by a re-prefill
        return self._upgrade_to_kv(hidden, len(self.running) + self._growth_reserve())

    # -- admission ---------------------------------------------------------------------------
    def _prefill(self, token_budget: int):
        """Continue partial prefills (oldest first), then admit waiting requests by the greedy."""
        seqs = []
        for req in self.running:
            if token_budget <= 0:
                break
            if req.is_prefilling and req.num_computed_tokens > 0:
                todo = min(req.num_uncomputed_tokens, token_budget)
                if not self._try_allocate(req, req.num_computed_tokens + todo):
                    break
                seqs.append(self._seq_plan(req, todo))
                token_budget -= todo
        slots = self.config.max_num_seqs - len(self.running)
        if not self.waiting or token_budget <= 0 or slots <= 0:
            return seqs
        waiting = list(self.waiting)
        w_p, w_v = self._waiting_pv
        new = len(waiting) - len(self._waiting_seen)  # preempted this iteration: put at the front
        if new:
            n_p, n_v = pending_and_violators(waiting[:new], self._now, self._lost)
            w_p, w_v = np.concatenate([n_p, w_p]), np.concatenate([n_v, w_v])
        computed = np.fromiter((r.num_computed_tokens for r in waiting), np.int64, len(waiting))
        total = np.fromiter((r.num_tokens for r in waiting), np.int64, len(waiting))
        tokens = total - computed
        # chunk where allowed, and always where a (preempted) request can never fit one step whole
        chunkable = (self.config.enable_chunked_prefill or self.config.iteration_shape == "mixed"
                     or tokens > self.config.max_num_batched_tokens)
        tokens = np.where(chunkable, np.minimum(tokens, token_budget), tokens)
        upto = computed + tokens
        # weigh a request by the blocks it is expected to hold at its end, not only this chunk's
        if self.growth_reserve > 0:
            grow = np.fromiter((self.slo.expected_remaining(r) for r in waiting), np.int64, len(waiting))
            held = np.maximum(upto, total + (self.growth_reserve * grow).astype(np.int64))
        else:
            held = upto
        kv_blocks = -(-held // self.blocks.block_size) if self.kv_on else np.zeros_like(upto)
        hid_blocks = -(-held // self.blocks.hidden_block_size) if self.hidden_on else np.zeros_like(upto)
        room = max(0, self.blocks.num_free - self._growth_reserve())
        if room == 0 and not self.running:
            room = self.blocks.num_free
        kv_blocks = np.minimum(kv_blocks, max(room, 1)) if not self.running else kv_blocks
        hid_blocks = np.minimum(hid_blocks, max(room, 1)) if not self.running else hid_blocks
        value = np.where(w_v, 0.0, w_p)
        # v_h = p - U * alpha * m_h prices choosing hidden over KV; with no KV option it is p
        hidden_value = value - self._U * self.alpha * hid_blocks if self.kv_on else value
        sel = select(Candidates(value, kv_blocks, hid_blocks, hidden_value, tokens, w_v),
                     Budgets(room, token_budget, slots))
        if sel.guard_used:
            self.stats["guard_used"] += 1
        for i in np.flatnonzero(sel.kind):
            req = waiting[i]
            kind = CacheKind.KV if sel.kind[i] == KV else CacheKind.HIDDEN
            if not self._try_allocate(req, int(upto[i]), (kind,)):
                continue  # the expected footprint was capped to an idle pool: this chunk still misses
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq_plan(req, int(tokens[i])))
            self.stats["admitted_kv" if sel.kind[i] == KV else "admitted_hidden"] += 1
            self.stats["violators_admitted"] += int(w_v[i])
        return seqs

    def _tbt_budget(self, num_decodes: int) -> int:
        kv = sum(len(t) for rid, t in self.blocks.tables.items() if self.blocks.kinds[rid] is CacheKind.KV)
        hidden = sum(len(t) for rid, t in self.blocks.tables.items() if self.blocks.kinds[rid] is CacheKind.HIDDEN)
        slo = min((r.tbt_slo for r in self.running), default=self.config.tbt_slo)
        return tbt_token_budget(self.cost, self.config.max_num_batched_tokens, slo, num_decodes, kv, hidden,
                                self.blocks.block_size)
