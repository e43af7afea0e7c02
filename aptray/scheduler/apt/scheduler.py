"""Apt-Serve's adaptive scheduler (arXiv 2504.07494), with what aptray adds (docs/SCHEDULER.md).

Every iteration:
1. view: pending times p and violators over the waiting set W and the running set R,
   U = |W| + |R| - violators, and the price of hidden from the step-cost model;
2. keep: a greedy by value per block decides which running requests keep their blocks; one it
   drops is re-prefilled as hidden in place where that fits, else preempted by recompute;
3. convert: while hidden costs step time, hidden -> KV upgrades that the pool's headroom and the
   step's token budget allow; the whole hidden set at once where the per-step cost it shares
   outweighs what its memory buys, or would stretch steps past the TBT budget;
4. admit: partial prefills continue, then each waiting request is offered as KV (value p) and, where
   a batch all hidden could pay for it within the TBT budget, as hidden (value p - U * price), and
   the greedy (greedy.select) picks who runs, and how.

iteration_shape "alternate" (the paper): a prefill-only iteration (4) when W's summed pending time
is at least R's (non-violators), else, or when nothing waiting fits, a decode-only one (2, 3).
"mixed": every iteration does 2 and 3, then 4 with the token budget left (sized for the TBT SLO).
"""
from __future__ import annotations

from itertools import compress
from operator import attrgetter

import numpy as np

from aptray.request import KIND_OF_CODE, CacheKind, Request
from aptray.scheduler.apt.features import (WaitingFeatures, computed_of, ints, is_lost, pending_and_violators,
                                           request_id, running_state)
from aptray.scheduler.apt.forecast import Forecast
from aptray.scheduler.apt.prefix import admission
from aptray.scheduler.apt.pricing import Pricing
from aptray.scheduler.apt.view import IterationView
from aptray.scheduler.base import Scheduler
from aptray.scheduler.apt.greedy import NONE, Budgets, Candidates, select
from aptray.scheduler.apt.slo_state import SloState
from aptray.scheduler.step_cost import TBT_HEADROOM, StepCostModel, binding_tbt_budget


_token_ids = attrgetter("token_ids")


class AptScheduler(Scheduler):
    chunks_long_prompts = True  # chunks whenever a prompt exceeds the step's token budget

    def __init__(self, config, blocks):
        super().__init__(config, blocks)
        self.hidden_on = config.cache_mode != "kv" and blocks.hidden_enabled
        self.kv_on = config.cache_mode != "hidden" or not blocks.hidden_enabled
        self.cost = StepCostModel(blocks.block_size, blocks.hidden_block_size)
        self.pricing = Pricing(self.cost, blocks.block_size, blocks.hidden_block_size)
        self.slo = SloState()
        self.forecast = Forecast(blocks, self.slo, self.hidden_on)
        self.waiting_features = WaitingFeatures()
        if self.kv_on and self.hidden_on:
            # keep cached prefixes as hidden: a hidden block holds twice the tokens of a KV one, and a
            # KV request can start from it by conversion; so KV copies are evicted first
            blocks.evict_first = CacheKind.KV

    @property
    def alpha(self) -> float:
        """Seconds of extra iteration time per hidden block (exported as a metric)."""
        return self.cost.alpha

    # -- one iteration -------------------------------------------------------------------------
    def schedule(self, now: float):
        conversions = self._requested_conversions()
        view = self._view(now)
        if self.config.iteration_shape == "mixed":
            seqs = self._mixed(view, conversions)
        else:
            seqs = self._alternate(view, conversions)
        if not seqs and not conversions and self.running:
            # every running request is mid-prefill with no block for its next chunk: free the
            # newest so the others can move (the policy must never stall)
            self._preempt(self.running[-1])
        if not seqs and not conversions and not self.running and self.waiting:
            # an idle pool with a queue the policy takes none of would wait for good (no step runs, so
            # nothing it prices changes): admit in queue order, as FCFS would
            seqs, _ = self._admit_in_order(self.config.max_num_batched_tokens)
            self.stats["stall_guard_admissions"] += len(seqs)
        return self._plan(seqs, conversions)

    def _view(self, now: float) -> IterationView:
        w_pending, w_violator, _ = self.waiting_features.pending(list(self.waiting), now, self.slo.lost)
        r_pending, r_violator = pending_and_violators(self.running, now, self.slo.lost)
        attainable = len(w_pending) + len(r_pending) - int(w_violator.sum()) - int(r_violator.sum())
        running = running_state(self.running)
        return IterationView(now, w_pending, w_violator, r_pending, r_violator, running,
                             list(compress(self.running, running.prefilling)), attainable, self.pricing.hidden_price())

    def _alternate(self, view: IterationView, conversions):
        prefilling = view.running.prefilling
        if self.waiting or prefilling.any():
            # mid-prefill running requests wait on a prefill iteration: they count on W's side
            live = ~view.r_violator
            waiting_wins = (view.w_pending[~view.w_violator].sum() + view.r_pending[live & prefilling].sum()
                            >= view.r_pending[live & ~prefilling].sum())
            if prefilling.all() or waiting_wins:
                seqs = self._admit(view, self.config.max_num_batched_tokens)
                if seqs:
                    self.stats["iterations_prefill"] += 1
                    return seqs
        if not self.running:
            return []
        self.stats["iterations_decode"] += 1
        return self._keep_running(view, conversions, self.config.max_num_batched_tokens)

    def _mixed(self, view: IterationView, conversions):
        budget = self._tbt_budget(view)
        seqs = self._keep_running(view, conversions, budget) if self.running else []
        reprojected = sum(c.num_tokens for c in conversions if c.to_kind is CacheKind.KV)
        seqs += self._admit(view, budget - sum(map(len, map(_token_ids, seqs)))
                            - self.pricing.reprojection_tokens(reprojected))
        if seqs:
            self.stats["iterations_mixed"] += 1
        return seqs

    def _tbt_slos(self) -> list[float]:
        """The TBT SLOs of the running requests that can still meet theirs (the default if none)."""
        lost = self.slo.lost  # requests that miss whatever happens size no step
        return [r.tbt_slo for r in self.running if r.request_id not in lost] or [self.config.tbt_slo]

    def _tbt_budget(self, view: IterationView) -> int:
        slos = self._tbt_slos()
        return binding_tbt_budget(self.cost, self.config.max_num_batched_tokens, slos,
                                  int((~view.running.prefilling).sum()), self.blocks.held_by(CacheKind.KV),
                                  self.blocks.held_by(CacheKind.HIDDEN), self.blocks.block_size,
                                  int(view.running.hidden.sum()))

    # -- 2. keep the running set ---------------------------------------------------------------
    def _keep_running(self, view: IterationView, conversions, token_budget: int):
        """Keep the running requests that fit all blocks, best value per block first; re-home as
        hidden or preempt the rest; plan one token for each kept request that is decoding."""
        running = list(self.running)
        n = len(running)
        bs = self.blocks.block_size
        hbs = self.blocks.hidden_block_size or bs
        ids = list(map(request_id, running))
        held = ints(self.blocks.held_each(ids), n)
        size, prefilling, hidden = view.running.size, view.running.prefilling, view.running.hidden
        # blocks held after this iteration: all its tokens when decoding, what it holds when
        # mid-prefill (its next chunk is admission's business), never less than it holds; a block
        # requests share (a cached prefix) is weighed once, on the pool, not on each of them
        need = np.maximum(np.where(prefilling, 1, -(-size // np.where(hidden, hbs, bs))), held)
        weight = np.maximum(need - np.asarray(self.blocks.shared_each(ids), np.int64), 1)
        pool = self.blocks.num_blocks - self.blocks.num_shared
        # value: its pending time (0 for a violator) plus what preempting it would cost, re-prefilling
        # its computed tokens. A violator between tokens keeps the second part: dropped mid re-prefill
        # it comes straight back, its work thrown away (docs/SCHEDULER.md, "Running set").
        # Only requests lost for good are worth nothing.
        lost = is_lost(running, self.slo.lost)
        value = np.where(lost, 0.0, np.where(view.r_violator, 0.0, view.r_pending)
                         + self.pricing.recompute_seconds(computed_of(running)))
        if int(weight.sum()) <= pool:
            kept = np.ones(n, bool)  # all fit: the greedy would keep every one
        else:
            self.forecast.short_at = view.now
            # a running hidden request stays hidden: alpha prices a choice it no longer has
            cands = Candidates(value, np.where(hidden, 0, weight), np.where(hidden, weight, 0), value,
                               np.zeros(n, np.int64), lost)
            sel = select(cands, Budgets(pool, 1, max(self.config.max_num_seqs, n)))
            if sel.guard_used:
                self.stats["guard_used"] += 1
            kept = sel.kind != NONE
        decoding = np.flatnonzero(kept & ~prefilling)
        room = pool - int(weight[kept].sum())
        tokens_left = token_budget - len(decoding)
        to_hidden = []
        for i in _by_value_per_block(value, need, ~kept):
            req = running[i]
            m_h = self.blocks.blocks_for(int(size[i]), CacheKind.HIDDEN) if self.hidden_on else 0
            if (not hidden[i] and not prefilling[i] and 0 < m_h <= room and size[i] <= tokens_left
                    and self._hidden_can_pay(view, m_h)):
                room -= m_h  # KV holds no layer inputs: re-prefill it as hidden, in place
                tokens_left -= int(size[i])
                self.blocks.free(req.request_id)
                to_hidden.append(req)
            else:
                self._preempt(req)

        for i in np.flatnonzero(kept & ~prefilling & (need > held)):
            if not self._try_allocate(running[i], int(size[i])):
                # the greedy counted it as fitting; if the count was wrong, preempting is safe
                # where a crash of the engine loop is not (seen once in a simulated sweep)
                self.stats["allocation_misses"] += 1
                self._preempt(running[i])
                decoding = decoding[decoding != i]
        for req in to_hidden:
            self._rehome_as_hidden(req)
        if self.config.cache_mode == "hybrid" and (view.price.costs_time or view.price.per_step > 0):
            conversions.extend(self._upgrades(view, tokens_left))  # before the plans name the blocks
        seqs = list(map(self._decode_plan, map(running.__getitem__, decoding.tolist())))
        seqs += [self._seq_plan(req, req.num_tokens) for req in to_hidden]
        return seqs

    def _rehome_as_hidden(self, req: Request) -> None:
        """KV -> hidden: the KV cache holds no layer inputs, so recompute them by a re-prefill."""
        req.cache_kind = None
        req.num_computed_tokens = 0
        self.blocks.ensure(req.request_id, CacheKind.HIDDEN, req.num_tokens)
        req.cache_kind = CacheKind.HIDDEN
        self.stats["conversions_to_hidden"] += 1

    # -- 3. convert ----------------------------------------------------------------------------
    def _upgrades(self, view: IterationView, token_budget: int):
        """Hidden -> KV (one projection) for the hidden requests holding most, where KV pays for its
        memory, while the projections fit the step's token budget (in tokens of step time: an
        upgrade of 1,869 tokens beside 43 decodes made a 116 ms step against a 100 ms TBT SLO) and
        the pool keeps its headroom."""
        hidden = [r for r in self.running if r.cache_kind is CacheKind.HIDDEN and not r.is_prefilling
                  and r.num_computed_tokens > 0]
        if not hidden:
            return []
        held = ints(self.blocks.held_each(map(request_id, hidden)), len(hidden))
        whole = self._end_hidden(view, hidden, held, token_budget)
        if whole is not None:
            return whole
        if not view.price.costs_time and view.price.per_step > 0:
            return []  # only the per-step part: upgrading some of the set saves none of it
        # one by one, each for its own price
        price = view.price.smoothed(held, view.price.step_share(True))
        hidden = list(compress(hidden, np.broadcast_to(self._kv_pays(view, price), held.shape)))
        hidden.sort(key=lambda r: -self.blocks.held(r.request_id))
        affordable = []
        for req in hidden:
            token_budget -= self.pricing.reprojection_tokens(req.num_computed_tokens)
            if token_budget < 0:
                break
            affordable.append(req)
        if not affordable:
            return []
        # keep free what the running set will grow into and what the queue will hold, each upgraded
        # request counted at its expected end as KV: an upgrade is cheap, undoing it is a re-prefill
        # as hidden or a preemption (CPU engine, counting only today's sizes: 25 upgrades and 26
        # KV -> hidden re-prefills in a 60-request run)
        growth = self.forecast.running_growth(self.running)
        index = {id(r): i for i, r in enumerate(growth.running)}
        committed = len(self.running) + int(growth.blocks.sum()) + self._queue_blocks(view.now)
        out = []
        for req in affordable:
            i = index.get(id(req))
            kv_now = self.blocks.blocks_for(req.num_tokens, CacheKind.KV)
            after = (committed if i is None else committed - int(growth.blocks[i])
                     + max(0, self.blocks.blocks_for(int(growth.final[i]), CacheKind.KV) - kv_now))
            if self.blocks.num_free - self._upgrade_extra_blocks(req) < after:
                continue
            conv = self._upgrade(req)
            if conv is None:
                break
            committed = after
            out.append(conv)
        return out

    def _end_hidden(self, view: IterationView, hidden, held, token_budget: int):
        """Every hidden request to KV at once, where hidden is no longer offered (not even a batch all
        hidden could pay the per-step cost, c_hany) and the pool holds their KV forms beside the
        running set's expected growth; None where not: upgrading only some saves none of c_hany.
        The queue's footprint is not kept free, as it is for a single upgrade: c_hany is paid by
        every step while one hidden request decodes. While hidden is on offer, ending the set only
        restarts it, at the margin's price (simulated multi-turn chat with a shared system prompt:
        one such upgrade at 3 req/s took apt-hybrid from 0.96 to 0.87 attainment).

        A set whose steps overrun the TBT budget makes every gap of every running request late: it
        ends wherever its KV forms fit what is free now, and its re-projections may also take the
        step time its c_hany would have taken, since the step that upgrades it no longer pays c_hany
        (simulated OPT-13B on the H100's profile at 12 req/s: a lone hidden request, admitted in the
        first steps, held 5 blocks fewer than KV beside 541 free, the running set's growth was
        forecast at 555 blocks and its re-projection at 188 tokens of a 73-token budget; it stayed
        hidden for 50 s, every step 26 ms dearer)."""
        if sum(r.cache_kind is CacheKind.HIDDEN for r in self.running) != len(hidden):
            return None  # one is mid-prefill: the step would keep its cost
        late = not self._gaps_absorb(view.price.per_step)
        if not late and self._memory_pays(view, held).any():
            return None
        extra = sum(map(self._upgrade_extra_blocks, hidden))
        if extra > self.blocks.num_free - (0 if late else self.forecast.expected_growth(self.running)):
            return None
        step_time = token_budget + (self.pricing.tokens_of_seconds(view.price.per_step) if late else 0)
        if sum(self.pricing.reprojection_tokens(r.num_computed_tokens) for r in hidden) > step_time:
            return None
        return [c for c in map(self._upgrade, hidden) if c is not None]

    def _queue_blocks(self, now: float) -> int:
        """Blocks the attainable waiting requests are expected to hold at their end, smallest form."""
        waiting = list(self.waiting)
        if not waiting:
            return 0
        _, violators, rows = self.waiting_features.pending(waiting, now, self.slo.lost)
        return self.forecast.blocks_at_end(self.forecast.waiting_final(self.waiting_features, rows[~violators]))

    # -- 4. admit ------------------------------------------------------------------------------
    def _admit(self, view: IterationView, token_budget: int):
        """Continue partial prefills (oldest first), then admit waiting requests by the greedy."""
        # only those mid-prefill at the start can be (the others decode, or start afresh: no chunk to continue)
        seqs, token_budget, _ = self._continue_prefills(token_budget, prefix_tokens=self._prefix_reprojection,
                                                        among=view.mid_prefill)
        slots = self.config.max_num_seqs - len(self.running)
        if not self.waiting or token_budget <= 0 or slots <= 0:
            return seqs
        waiting = list(self.waiting)  # requests preempted this iteration are at the front
        wf = self.waiting_features
        pending, violator, rows = wf.pending(waiting, view.now, self.slo.lost)
        computed, total, outputs = wf.computed[rows], wf.tokens[rows], wf.outputs[rows]

        def chunkable(todo):  # where allowed, and always where a (preempted) request can never fit one step whole
            return (self.config.enable_chunked_prefill or self.config.iteration_shape == "mixed"
                    or todo > self.config.max_num_batched_tokens)
        # each kind on offer, its cached prefix (if any) counted as computed
        options = {kind: admission(self.blocks, waiting, kind, computed, total, outputs, token_budget, chunkable,
                                   self.pricing.reprojection_tokens)
                   for kind, on in ((CacheKind.KV, self.kv_on), (CacheKind.HIDDEN, self.hidden_on)) if on}
        kv, hid = options.get(CacheKind.KV), options.get(CacheKind.HIDDEN)
        none = np.zeros_like(total)
        kv_blocks = kv.blocks if kv is not None else none
        hid_blocks = hid.blocks if hid is not None else none
        room = self.blocks.num_free
        # its tokens so far need more than the whole pool as KV (as Scheduler._kinds_for)
        kv_never = self.blocks.blocks_for(total, CacheKind.KV) > self.blocks.num_blocks
        if not self.running:  # an idle pool takes anyone: weigh no one above what is free
            kv_blocks = np.minimum(kv_blocks, max(room, 1))
            hid_blocks = np.minimum(hid_blocks, max(room, 1))
        value = np.where(violator, 0.0, pending)
        final = self.forecast.waiting_final(wf, rows)
        cands = self._cache_options(view, value, kv_blocks, hid_blocks, (kv or hid).cost,
                                    hid.cost if kv is not None and hid is not None else None, violator, final,
                                    kv_never)
        sel = select(cands, Budgets(room, token_budget, slots, *self._admission_caps(cands, room, final)))
        if sel.guard_used:
            self.stats["guard_used"] += 1
        admitted = []
        for i in np.flatnonzero(sel.kind):
            req, kind = waiting[i], KIND_OF_CODE[int(sel.kind[i])]
            chunk = int(options[kind].chunk[i])
            todo = self._take_first_kind(req, (kind,), lambda: min(chunk, req.num_uncomputed_tokens))
            if not todo:
                continue  # weighed within an idle pool's free blocks, its chunk may still miss
            admitted.append(req)
            seqs.append(self._start(req, todo))
            self.stats[f"admitted_{kind.value}"] += 1
            self.stats["violators_admitted"] += int(violator[i])
        # the pool is short when an attainable request is left waiting that does not fit what is free
        smallest = np.where(cands.hidden_blocks > 0, cands.hidden_blocks, cands.kv_blocks)
        if (smallest[~violator & (sel.kind == NONE)] > self.blocks.num_free).any():
            self.forecast.short_at = view.now
        self._remove_waiting(admitted)
        return seqs

    def _prefix_reprojection(self, req: Request) -> int:
        """A hidden chunk re-projects its cached prefix to K, V: step time, in tokens."""
        if req.cache_kind is not CacheKind.HIDDEN:
            return 0
        return self.pricing.reprojection_tokens(req.num_computed_tokens)

    def _cache_options(self, view: IterationView, value, kv_blocks, hid_blocks, tokens, hidden_tokens, violator,
                       final, kv_never) -> Candidates:
        """Each waiting request as KV (kv_blocks, tokens, value p) and as hidden (hid_blocks,
        hidden_tokens, value v_h = p - U * price: the paper's alpha * m_h plus absorbed attention's
        per-request cost), KV offered only where it pays for its memory. An upgrade item weighs what
        KV holds beyond hidden by the request's expected end. A request that only fits the pool as
        hidden (kv_never) is offered as hidden whatever hidden costs: offered as KV alone it would wait
        for good (an idle pool took it as KV, within what is free, and then had no blocks for it)."""
        if not (self.kv_on and self.hidden_on):  # one option: v_h = p
            return Candidates(value, kv_blocks, hid_blocks, value, tokens, violator)
        step_share = view.price.step_share(self._hidden_decoding())
        price = np.broadcast_to(view.price.of(hid_blocks, step_share), value.shape)
        offered = self._kv_pays(view, view.price.smoothed(hid_blocks, step_share))
        hidden_offered = np.broadcast_to(self._hidden_can_pay(view, hid_blocks), value.shape) | kv_never
        hid_blocks = np.where(hidden_offered, hid_blocks, 0)
        offered = (offered | ~hidden_offered) & ~kv_never
        upgrade_blocks = self.blocks.blocks_for(final, CacheKind.KV) - self.blocks.blocks_for(final, CacheKind.HIDDEN)
        return Candidates(value, np.where(offered, kv_blocks, 0), hid_blocks,
                          np.where(offered, value - view.attainable * price, value), tokens, violator,
                          upgrade_blocks, hidden_tokens)

    def _admission_caps(self, cands: Candidates, room: int, final) -> tuple[int | None, int | None]:
        """Blocks the upgrade items, and the violators, may take (None: no cap of their own).

        Upgrades: what neither the running set's growth nor the queue's end footprint as hidden
        needs. An upgrade only buys step time (U * alpha * m_h, often under a millisecond); the
        blocks it takes would otherwise absorb growth that, once the pool is full, costs a
        re-prefill as hidden or a preemption. Violators: what the running set's growth does not
        need. A violator relieves no pending time that counts; admitted into blocks the running set
        then grows into, it is the first dropped again, its (re-)prefill wasted."""
        growth = None
        upgrades = violators = None
        if self.kv_on and self.hidden_on and (cands.hidden_value < cands.value).any():
            growth = self.forecast.expected_growth(self.running)
            upgrades = max(0, room - growth - self.forecast.blocks_at_end(final[~cands.violator]))
        if cands.violator.any() and self.running:
            growth = self.forecast.expected_growth(self.running) if growth is None else growth
            violators = max(0, room - growth)
        return upgrades, violators

    # -- prices that depend on the running set ---------------------------------------------------
    def _hidden_decoding(self) -> bool:
        return any(r.cache_kind is CacheKind.HIDDEN and not r.is_prefilling for r in self.running)

    def _hidden_can_pay(self, view: IterationView, hidden_blocks):
        """Whether holding hidden_blocks as hidden could buy more than it costs: with every running
        request hidden, sharing the per-step cost (c_hany). Where even that set costs more step time
        than its memory buys, hidden is not offered: a few hidden requests would make every step pay
        c_hany for as long as they live (simulated OPT-13B at 16 ms a hidden step: apt 0.49-0.74
        attainment against apt-kv's 0.58-0.79; docs/SCHEDULER.md, "c_hany"). Nor where a step with
        c_hany would not end within the TBT budget: the memory then buys requests whose every gap
        between tokens runs late."""
        if not self._gaps_absorb(view.price.per_step):
            return np.zeros(np.shape(hidden_blocks), bool)
        return self._memory_pays(view, hidden_blocks)

    def _memory_pays(self, view: IterationView, hidden_blocks):
        """Whether holding hidden_blocks as hidden buys more memory than it costs step time, with every
        running request hidden and sharing c_hany (_hidden_can_pay without the TBT check)."""
        price = view.price.smoothed(hidden_blocks, view.price.set_share(len(self.running) + 1))
        return ~self.pricing.kv_worth_its_memory(price, len(self.running))

    def _gaps_absorb(self, per_step: float) -> bool:
        """Whether steps carrying per_step more seconds would still end within the TBT budget
        (TBT_HEADROOM of the tightest SLO running, as the mixed shape sizes its steps), at the recent
        step time. c_hany is added to every gap of every running request, not only shared as
        throughput (simulated OPT-13B on the H100's measured profile, 16 req/s, 8 ms a hidden step:
        steps of ~62 ms grew to 75-87 ms with hidden rows, and apt met 0.730 against apt-kv's 0.877)."""
        return per_step <= 0 or self.pricing.step_seconds + per_step <= TBT_HEADROOM * min(self._tbt_slos())

    def _kv_pays(self, view: IterationView, price) -> np.ndarray:
        """Per request, by its (averaged) price of being hidden: whether to offer KV. Always while
        memory is not tight; after a shortage, or under a load that would not fit as KV, only where
        hidden costs more step time than its memory buys (Pricing.kv_worth_its_memory). Without
        this, KV requests saved a sliver of each step and, when the pool ran short within their life,
        were re-prefilled as hidden or preempted (CPU engine, ShareGPT, 48 blocks: 19-32 KV -> hidden
        re-prefills per 60-request run)."""
        if not self.forecast.memory_is_tight(view.now):
            return np.ones(np.shape(price), bool)
        return self.pricing.kv_worth_its_memory(price, len(self.running))

    # -- request lifecycle ---------------------------------------------------------------------
    def add(self, req) -> None:
        super().add(req)
        self.forecast.arrivals.append(req.arrival_time)

    def observe(self, plan, result) -> None:
        self.cost.observe(plan, result.step_time)
        self.pricing.observe(plan, result.step_time)

    def update(self, plan, result, now):
        got = super().update(plan, result, now)
        for req in got:
            self.slo.on_token(req)
        return got

    def finish(self, req, status) -> None:
        super().finish(req, status)
        self.slo.on_finish(req)
        self.waiting_features.forget(req)

    def _preempt(self, req) -> None:
        super()._preempt(req)
        self.waiting_features.forget(req)  # back in the queue with a new pending-time origin and length


def _by_value_per_block(value: np.ndarray, need: np.ndarray, mask: np.ndarray) -> list[int]:
    """Indices in mask, best value per block first (ties: running-set order)."""
    idx = np.flatnonzero(mask)
    return list(idx[np.lexsort((idx, -value[idx] / need[idx]))])
