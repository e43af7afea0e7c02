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

from collections import deque
from itertools import compress, filterfalse, repeat
from operator import attrgetter

import numpy as np

from aptray.request import CacheKind, Request, RequestStatus
from aptray.scheduler.base import Scheduler
from aptray.scheduler.greedy import HIDDEN, KV, Budgets, Candidates, select
from aptray.scheduler.slo_state import SloState
from aptray.scheduler.step_cost import PF, REP, SEQ, TOK, StepCostModel, binding_tbt_budget

# Share of the running set's expected growth (blocks it will add before it ends) kept out of
# admission; 0 = admit while blocks are free (vLLM), and decoding preempts when they run out.
# Measured (docs/SCHEDULER.md): 0.5 and 1 cut preemptions to ~0 but lost attainment at every
# rate (held-back admissions miss TTFT), so it is off; lost requests absorb the preemptions.
GROWTH_RESERVE = 0.0
UNRESOLVED_HIDDEN_PRICE = 1e-9  # seconds: a tie-break toward KV, far below any pending time
ALPHA_RESOLUTION = 0.05  # |alpha| below this share of the step-cost model's prior scale counts as 0
STEP_DECAY = 0.9  # EWMA of step times (about the last 10 steps)
ARRIVALS_SEEN = 64  # arrival times kept to estimate the arrival rate
LOAD_SIGMAS = 2.0  # KV for everyone must fit the pool this many standard deviations above the mean load
PRICE_DECAY = 0.98  # EWMA of the price of hidden (about the last 50 steps)


_prompt = attrgetter("prompt_token_ids")
_output = attrgetter("output_token_ids")
_computed = attrgetter("num_computed_tokens")
_rid = attrgetter("request_id")
_kind = attrgetter("cache_kind")
_max_tokens = attrgetter("sampling.max_tokens")
_token_ids = attrgetter("token_ids")


def _ints(values, n: int) -> np.ndarray:
    return np.fromiter(values, np.int64, n)


def num_tokens_of(reqs) -> np.ndarray:
    """Prompt + output tokens per request (C-level maps: no Python call per request)."""
    n = len(reqs)
    return _ints(map(len, map(_prompt, reqs)), n) + _ints(map(len, map(_output, reqs)), n)


def pending_and_violators(reqs, now: float, lost=None) -> tuple[np.ndarray, np.ndarray]:
    """Pending times, and who is a violator: past its SLO now, or (given lost) lost for good.
    A request with no token yet that passed its TTFT SLO is a violator here and lost for good."""
    n = len(reqs)
    pending = np.fromiter((now - (r.last_token_time if r.last_token_time is not None else r.arrival_time)
                           for r in reqs), float, n)
    slo = np.fromiter((r.tbt_slo if r.first_token_time is not None else r.ttft_slo for r in reqs), float, n)
    viol = pending > slo
    if lost:
        viol |= np.fromiter(map(lost.__contains__, map(_rid, reqs)), bool, n)
    return pending, viol


def _resolved(value: float, scale: float) -> float:
    """value, or 0 while it is within ALPHA_RESOLUTION of its prior scale of 0."""
    return value if abs(value) > ALPHA_RESOLUTION * scale else 0.0


class WaitingFeatures:
    """What the policy reads of each waiting request, in arrays, read from the request once.

    A waiting request gets no token and computes nothing until it is admitted, so its pending-time
    origin, its SLO, its tokens and whether it is lost stay fixed while it waits (a preemption
    changes them: the request leaves and comes back with a fresh row). Each iteration then costs
    one dict lookup per waiting request instead of several attribute reads and branches."""

    def __init__(self):
        self.row: dict[Request, int] = {}
        self.ref = np.zeros(64)          # last token time, or arrival before the first
        self.slo = np.zeros(64)          # TBT SLO after the first token, TTFT SLO before
        self.tokens = np.zeros(64, np.int64)
        self.computed = np.zeros(64, np.int64)
        self.outputs = np.zeros(64, np.int64)
        self.left = np.zeros(64, np.int64)     # tokens it may still generate (max_tokens - outputs)
        self.lost = np.zeros(64, bool)
        self.used = 0

    def rows(self, reqs, lost: set[str]) -> np.ndarray:
        rows = np.fromiter(map(self.row.get, reqs, repeat(-1)), np.int64, len(reqs))
        new = np.flatnonzero(rows < 0)
        if len(new) == 0:
            return rows
        # make room before adding: compacting mid-way would leave the rows read above pointing at
        # other requests' slots (a stale, longer token count planned a re-prefill past its end)
        if self.used + len(new) > len(self.ref):
            self._make_room(len(new))
            rows = np.fromiter(map(self.row.get, reqs, repeat(-1)), np.int64, len(reqs))
        for i in new:
            rows[i] = self._add(reqs[i], lost)
        return rows

    def forget(self, req: Request) -> None:
        self.row.pop(req, None)

    def _add(self, req: Request, lost: set[str]) -> int:
        i = self.used
        self.used += 1
        started = req.last_token_time is not None
        self.ref[i] = req.last_token_time if started else req.arrival_time
        self.slo[i] = req.tbt_slo if req.first_token_time is not None else req.ttft_slo
        self.tokens[i] = req.num_tokens
        self.computed[i] = req.num_computed_tokens
        self.outputs[i] = len(req.output_token_ids)
        self.left[i] = req.sampling.max_tokens - self.outputs[i]
        self.lost[i] = req.request_id in lost
        self.row[req] = i
        return i

    def _make_room(self, extra: int) -> None:
        """Drop the rows of requests gone; double the arrays until the rows kept take at most half."""
        keep = np.fromiter(self.row.values(), np.int64, len(self.row))
        size = len(self.ref)
        while 2 * (len(keep) + extra) > size:
            size *= 2
        for name in ("ref", "slo", "tokens", "computed", "outputs", "left", "lost"):
            old = getattr(self, name)
            new = np.zeros(size, old.dtype)
            new[:len(keep)] = old[keep]
            setattr(self, name, new)
        self.row = dict(zip(self.row, range(len(keep))))
        self.used = len(keep)


class AptScheduler(Scheduler):
    chunks_long_prompts = True  # chunks whenever a prompt exceeds the step's token budget

    def __init__(self, config, blocks):
        super().__init__(config, blocks)
        self.cost = StepCostModel(blocks.block_size, blocks.hidden_block_size)
        self.hidden_on = config.cache_mode != "kv" and blocks.hidden_enabled
        self.kv_on = config.cache_mode != "hidden" or not blocks.hidden_enabled
        self.slo = SloState()
        self.growth_reserve = GROWTH_RESERVE
        self._wf = WaitingFeatures()
        self._short_at = -np.inf  # last time the pool was too small for what wanted to run
        self._step_seconds = 0.0  # EWMA of step times
        self._alpha_avg = self._hdec_avg = 0.0  # EWMAs of the fitted price of hidden, per iteration
        self._arrivals: deque[float] = deque(maxlen=ARRIVALS_SEEN)

    @property
    def alpha(self) -> float:
        """Seconds of extra iteration time per hidden block (exported as a metric)."""
        return self.cost.alpha

    def _price_of_hidden(self) -> float:
        """alpha, or 0 while it is within a twentieth of its prior scale of 0 (the fit cannot tell
        hidden from KV apart: an upgrade, or a KV admission, would buy nothing measurable)."""
        return _resolved(self.cost.alpha, self.cost.prior_scale)

    def _price_per_hidden_decode(self) -> float:
        """Extra step seconds per hidden request decoding (absorbed attention's projections), or 0
        within a twentieth of its prior scale."""
        return _resolved(self.cost.hidden_decode_cost, self.cost.prior_scale_per_decode)

    def _price_per_hidden_step(self) -> float:
        """Extra step seconds of having any hidden decode in a step, for the first hidden request to
        decode (0 once one does: later ones share it), or 0 within a twentieth of its prior scale."""
        if any(r.cache_kind is CacheKind.HIDDEN and not r.is_prefilling for r in self.running):
            return 0.0
        return _resolved(self.cost.hidden_step_cost, self.cost.prior_scale_per_step)

    def _hidden_price(self, hid_blocks: np.ndarray) -> np.ndarray | float:
        """Extra step seconds of holding each request as hidden rather than KV. While the fit
        cannot tell the two apart (both parts within resolution of 0), a token price: KV where it
        fits, hidden where only hidden fits. A price of exactly 0 made every admission hidden (it
        is the denser item), so no step ever mixed kinds and the fit could never learn what hidden
        costs (simulated OPT-13B ShareGPT: all hidden, steps ~8% slower than KV, 1.6 against
        4.25 req/s)."""
        per_block, per_decode = self._price_of_hidden(), self._price_per_hidden_decode()
        per_step = self._price_per_hidden_step()
        if not (per_block or per_decode or per_step):
            return UNRESOLVED_HIDDEN_PRICE
        return per_block * hid_blocks + per_decode + per_step

    def _hidden_costs_time(self) -> bool:
        return self._price_of_hidden() > 0 or self._price_per_hidden_decode() > 0

    def _pool_was_short(self) -> bool:
        """Whether the pool was too small for what wanted to run within the time a request holds its
        blocks (the mean decode time of finished ones; before any has finished, at any time)."""
        if self._short_at == -np.inf:
            return False
        life = self.slo.mean_decode_seconds
        return life is None or self._now - self._short_at <= life

    def _kv_pays(self, price: np.ndarray) -> np.ndarray:
        """Per request, by its price of being hidden (extra step seconds): whether KV is worth its
        memory. Always while the pool has room and the expected load would fit it as KV; after a
        shortage, or under a load that would not fit, only where hidden costs more than the
        throughput its memory buys: a hidden request frees (1 - r) of its KV blocks, room for
        (1 - r) more requests, and adds its price to a step the N running requests share, so hidden
        pays while price < (1 - r) * step / N. Without this rule KV requests saved a sliver of each
        step and, when the pool ran short again within their life, were re-prefilled as hidden or
        preempted (a whole prefill, and a slow gap for every running request): on the CPU engine
        (ShareGPT, 48 blocks, 1-2 req/s) 14-25 upgrades and 19-32 KV -> hidden re-prefills per
        60-request run. The recompute path's price (a re-projection of the whole context per step)
        keeps its KV option: there hidden costs more time than its memory buys."""
        if not self._pool_was_short() and self._load_fits_as_kv():
            return np.ones(np.shape(price), bool)
        r = self.blocks.block_size / self.blocks.hidden_block_size
        return np.asarray(price) > (1 - r) * self._step_seconds / max(1, len(self.running))

    def _smoothed_price(self, hid_blocks: np.ndarray) -> np.ndarray:
        """The price of hidden by the step-cost model's alpha and c_hdec averaged over about the last
        50 iterations: where the batch is mostly hidden the fit can trade c_hdec against c_seq from
        one step to the next (seen in the simulator: c_hdec 0 -> 6.3 -> 0 ms in three runs), while
        the choice of KV over hidden must follow what hidden costs, not that noise."""
        return self._alpha_avg * hid_blocks + self._hdec_avg + self._price_per_hidden_step()

    def add(self, req) -> None:
        super().add(req)
        self._arrivals.append(req.arrival_time)

    def _load_fits_as_kv(self) -> bool:
        """Whether the expected load fits the pool as KV: the tokens the running set holds at a time
        (mean + LOAD_SIGMAS standard deviations, SloState.held_tokens at the recent arrival rate)
        within the pool's KV capacity. Past it, KV requests would make the pool short sooner or later."""
        if len(self._arrivals) < 2 or self._arrivals[-1] <= self._arrivals[0]:
            return True
        rate = (len(self._arrivals) - 1) / (self._arrivals[-1] - self._arrivals[0])
        held = self.slo.held_tokens(rate)
        if held is None:
            return True
        return held[0] + LOAD_SIGMAS * held[1] <= self.blocks.num_blocks * self.blocks.block_size

    def observe(self, plan, result) -> None:
        self.cost.observe(plan, result.step_time)
        if plan.seqs and result.step_time > 0:
            self._step_seconds = STEP_DECAY * self._step_seconds + (1 - STEP_DECAY) * result.step_time
        if self.cost.ready:
            self._alpha_avg = PRICE_DECAY * self._alpha_avg + (1 - PRICE_DECAY) * self._price_of_hidden()
            self._hdec_avg = PRICE_DECAY * self._hdec_avg + (1 - PRICE_DECAY) * self._price_per_hidden_decode()

    def update(self, plan, result, now):
        got = super().update(plan, result, now)
        for req in got:
            self.slo.on_token(req)
        return got

    def finish(self, req, status) -> None:
        super().finish(req, status)
        self.slo.on_finish(req)
        self._wf.forget(req)

    def _preempt(self, req) -> None:
        super()._preempt(req)
        self._wf.forget(req)  # back in the queue with a new pending-time origin and length

    def _waiting_pending(self, waiting, now: float):
        """pending_and_violators for waiting requests, from their rows; also their rows."""
        wf = self._wf
        rows = wf.rows(waiting, self.slo.lost)
        pending = now - wf.ref[rows]
        return pending, (pending > wf.slo[rows]) | wf.lost[rows], rows

    def _lost_now(self, now: float) -> set[str]:
        """Requests that cannot attain their SLO any more. Those whose TTFT passed without a token
        are violators by their pending time already (pending_and_violators), so only SloState's."""
        return self.slo.lost

    def _running_growth(self) -> tuple[list[Request], np.ndarray, np.ndarray]:
        """The attainable running requests, the tokens each is expected to end with, and the blocks
        each is expected to add before it ends (expected decode length: the mean output of finished
        requests; no request's own length is known)."""
        lost = self.slo.lost
        running = [r for r in self.running if r.request_id not in lost] if lost else self.running
        n = len(running)
        if not n:
            return running, np.zeros(0, np.int64), np.zeros(0, np.int64)
        made = _ints(map(len, map(_output, running)), n)
        final = num_tokens_of(running) + self.slo.expected_remaining_of(made, _ints(map(_max_tokens, running), n) - made)
        per = np.where(np.fromiter(map(CacheKind.HIDDEN.__eq__, map(_kind, running)), bool, n),
                       self.blocks.hidden_block_size or self.blocks.block_size, self.blocks.block_size)
        held = _ints(map(len, map(self.blocks.tables.get, map(_rid, running), repeat(()))), n)
        return running, final, np.maximum(0, -(-final // per) - held)

    def _expected_growth(self) -> int:
        """Blocks the attainable running requests are expected to add before they end."""
        return int(self._running_growth()[2].sum())

    def _waiting_final(self, rows: np.ndarray) -> np.ndarray:
        """Tokens each waiting request (by its WaitingFeatures row) is expected to end with."""
        wf = self._wf
        return wf.tokens[rows] + self.slo.expected_remaining_of(wf.outputs[rows], wf.left[rows])

    def _queue_blocks(self, waiting) -> int:
        """Blocks the attainable waiting requests are expected to hold at their end in their smallest
        form: what an upgrade to KV must leave free, or the queue it would have made room for waits
        and the upgrade is undone by a re-prefill as hidden or a preemption."""
        if not waiting:
            return 0
        _, w_v, rows = self._waiting_pending(waiting, self._now)
        return self._blocks_at_end(self._waiting_final(rows[~w_v]))

    def _blocks_at_end(self, final: np.ndarray) -> int:
        """Blocks requests ending with `final` tokens hold then in their smallest form."""
        per = self.blocks.hidden_block_size if self.hidden_on else self.blocks.block_size
        return int((-(-final // per)).sum())

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
        w_p, w_v, _ = self._waiting_pending(self._waiting_seen, now)
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

    def _running_state(self):
        """Per running request: tokens, whether it is mid-prefill, whether it is hidden."""
        running = self.running
        n = len(running)
        size = num_tokens_of(running)
        outputs = _ints(map(len, map(_output, running)), n)
        prefilling = (size - _ints(map(_computed, running), n) > 1) | (outputs == 0)
        hidden = np.fromiter(map(CacheKind.HIDDEN.__eq__, map(_kind, running)), bool, n)
        return size, prefilling, hidden

    def _alternate(self, w_p, w_v, r_p, r_v, conversions):
        prefilling = self._running_state()[1]
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
        state = self._running_state()
        _, prefilling, hidden = state
        budget = self._tbt_budget(int((~prefilling).sum()), hidden)
        seqs = self._decode(r_p, r_v, conversions, budget, state) if self.running else []
        reprojected = sum(c.num_tokens for c in conversions if c.to_kind == "kv")
        seqs += self._prefill(budget - sum(map(len, map(_token_ids, seqs))) - self._reprojection_tokens(reprojected))
        if seqs:
            self.stats["iterations_mixed"] += 1
        return seqs

    # -- the running set ---------------------------------------------------------------------
    def _decode(self, r_p, r_v, conversions, token_budget: int, state=None):
        """Keep the running requests that fit all blocks, best value per block first; convert
        or preempt the rest; plan one token for each kept request that is decoding. state: the
        running set's _running_state, where the caller has just read it."""
        running = list(self.running)
        tables, bs = self.blocks.tables, self.blocks.block_size
        hbs = self.blocks.hidden_block_size or bs
        held = _ints(map(len, map(tables.get, map(_rid, running), repeat(()))), len(running))
        size, prefilling, hidden = state if state is not None else self._running_state()
        # blocks held after this iteration: all its tokens when decoding, what it holds when
        # mid-prefill (its next chunk is admission's business), and never less than it holds: a kept
        # request gives back none of its blocks
        need = np.maximum(np.where(prefilling, 1, -(-size // np.where(hidden, hbs, bs))), held)
        # value of keeping a running request: its pending time (0 for a violator), plus what
        # preempting it would cost: re-prefilling the tokens it has computed, time every request
        # waits for. A violator between tokens (its current gap is already slow) keeps that
        # second part: dropping it, e.g. mid re-prefill after a preemption, throws the work away
        # and it comes straight back (measured: one request preempted four times running).
        # Only requests lost for good (SloState) are worth nothing and go first.
        lost = np.fromiter(map(self.slo.lost.__contains__, map(_rid, running)), bool, len(running))
        value = np.where(lost, 0.0, np.where(r_v, 0.0, r_p)
                         + self._recompute_time(_ints(map(_computed, running), len(running))))
        hidden_value = value  # running hidden requests stay hidden: alpha prices a choice they no longer have
        if int(need.sum()) <= self.blocks.num_blocks:
            kept = np.ones(len(running), bool)  # all fit: the greedy would keep every one
        else:
            self._short_at = self._now
            cands = Candidates(value, np.where(hidden, 0, need), np.where(hidden, need, 0), hidden_value,
                               np.zeros(len(running), np.int64), lost)
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
            if not self._try_allocate(running[i], int(size[i])):
                # the greedy counted it as fitting; if the count was wrong, preempting is safe
                # where a crash of the engine loop is not (seen once in a simulated sweep)
                self.stats["allocation_misses"] += 1
                self._preempt(running[i])
                decoding = decoding[decoding != i]
        for req in to_hidden:
            self._rehome_as_hidden(req)
        if self.config.cache_mode == "hybrid" and self._hidden_costs_time():
            conversions.extend(self._upgrades_with_headroom(tokens_left))  # before the plans name the blocks
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

    def _reprojection_tokens(self, tokens: int) -> int:
        """Step time of re-projecting `tokens` stored hidden vectors to K, V, in tokens of the step's
        per-token cost (0 until the cost model sees both)."""
        c = self.cost.coef
        if not self.cost.ready or c[TOK] <= 0 or c[REP] <= 0:
            return 0
        return int(c[REP] / 1e3 * tokens / c[TOK])

    def _recompute_time(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds to re-prefill `tokens` tokens in one chunk, by the step-cost model (0 until it is calibrated)."""
        if not self.cost.ready:
            return np.zeros(len(tokens))
        c = self.cost.coef
        t = tokens.astype(float)
        return np.maximum(0.0, c[TOK] * t + c[SEQ] + c[PF] * t * t / 1e3)

    def _upgrades_with_headroom(self, token_budget: int):
        """Hidden -> KV (one projection) for the hidden requests costing most, while a block per
        running request stays free and the projections fit the step's token budget (in tokens of
        step time: an upgrade of 1,869 tokens beside 43 decodes made a 116 ms step against a
        100 ms TBT SLO in the simulated OPT-13B ShareGPT run): only worth it when hidden steps cost
        time (alpha > 0)."""
        hidden = [r for r in self.running if r.cache_kind is CacheKind.HIDDEN and not r.is_prefilling
                  and r.num_computed_tokens > 0]
        if not hidden:
            return []
        held = _ints(map(len, map(self.blocks.tables.get, map(_rid, hidden))), len(hidden))
        hidden = list(compress(hidden, np.broadcast_to(self._kv_pays(self._smoothed_price(held)), held.shape)))
        hidden.sort(key=lambda r: -len(self.blocks.tables[r.request_id]))
        affordable = []
        for req in hidden:
            token_budget -= self._reprojection_tokens(req.num_computed_tokens)
            if token_budget < 0:
                break
            affordable.append(req)
        if not affordable:
            return []
        # keep free what the running set will grow into and what the queue will hold, with each
        # upgraded request counted at its expected end as KV: an upgrade is cheap, undoing it is a
        # re-prefill as hidden or a preemption (measured on the CPU engine: 25 upgrades and 26
        # KV -> hidden re-prefills in a 60-request run when only the current sizes were counted)
        running, final, growth = self._running_growth()
        index = {id(r): i for i, r in enumerate(running)}
        bs = self.blocks.block_size
        committed = len(self.running) + int(growth.sum()) + self._queue_blocks(list(self.waiting))
        out = []
        for req in affordable:
            i = index.get(id(req))
            kv_now = self.blocks.blocks_for(req.num_tokens, CacheKind.KV)
            after = committed if i is None else committed - int(growth[i]) + max(0, -(-int(final[i]) // bs) - kv_now)
            if self.blocks.num_free - self._upgrade_extra_blocks(req) < after:
                continue
            conv = self._upgrade(req)
            if conv is None:
                break
            committed = after
            out.append(conv)
        return out

    # -- admission ---------------------------------------------------------------------------
    def _prefill(self, token_budget: int):
        """Continue partial prefills (oldest first), then admit waiting requests by the greedy."""
        seqs = []
        for req in self.running:
            if token_budget <= 0:
                break
            if req.is_prefilling and req.num_computed_tokens > 0:
                # a hidden chunk re-projects its cached prefix to K, V: that takes step time too.
                # At least half the budget goes to new tokens, or a long prefix would be re-projected
                # for a sliver of progress, step after step
                extra = self._reprojection_tokens(req.num_computed_tokens) if req.cache_kind is CacheKind.HIDDEN else 0
                todo = min(req.num_uncomputed_tokens, max(token_budget - extra, token_budget // 2, 1))
                if not self._try_allocate(req, req.num_computed_tokens + todo):
                    break
                seqs.append(self._seq_plan(req, todo))
                token_budget -= todo + extra
        slots = self.config.max_num_seqs - len(self.running)
        if not self.waiting or token_budget <= 0 or slots <= 0:
            return seqs
        waiting = list(self.waiting)  # requests preempted this iteration are at the front
        w_p, w_v, rows = self._waiting_pending(waiting, self._now)
        computed, total = self._wf.computed[rows], self._wf.tokens[rows]
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
        # a request coming back from a preemption (it has outputs) re-prefills its whole context:
        # weigh it by all of it, so that it starts only when all of it fits. Started on the room of
        # one chunk it was dropped again mid-way as the running set grew (measured: one request
        # dropped five times in a row, each time throwing away up to 470 re-computed tokens)
        held = np.where(self._wf.outputs[rows] > 0, np.maximum(held, total), held)
        kv_blocks = -(-held // self.blocks.block_size) if self.kv_on else np.zeros_like(upto)
        hid_blocks = -(-held // self.blocks.hidden_block_size) if self.hidden_on else np.zeros_like(upto)
        room = max(0, self.blocks.num_free - self._growth_reserve())
        if room == 0 and not self.running:
            room = self.blocks.num_free
        kv_blocks = np.minimum(kv_blocks, max(room, 1)) if not self.running else kv_blocks
        hid_blocks = np.minimum(hid_blocks, max(room, 1)) if not self.running else hid_blocks
        value = np.where(w_v, 0.0, w_p)
        final = self._waiting_final(rows)
        hidden_value, upgrade_blocks = value, None  # no KV option (or no hidden one): v_h = p
        if self.kv_on and self.hidden_on:
            # v_h = p - U * (alpha * m_h + c_hdec) prices choosing hidden over KV (the paper's
            # alpha * m_h, plus the per-request cost of absorbed attention), where KV is offered
            price = np.broadcast_to(self._hidden_price(hid_blocks), value.shape)
            offered = self._kv_pays(self._smoothed_price(hid_blocks))
            kv_blocks = np.where(offered, kv_blocks, 0)
            hidden_value = np.where(offered, value - self._U * price, value)
            # an upgrade weighs what KV holds beyond hidden by the request's expected end
            upgrade_blocks = -(-final // self.blocks.block_size) - -(-final // self.blocks.hidden_block_size)
        sel = select(Candidates(value, kv_blocks, hid_blocks, hidden_value, tokens, w_v, upgrade_blocks),
                     Budgets(room, token_budget, slots, self._upgrade_room(room, hidden_value, value, final, w_v),
                             self._violator_room(room, w_v)))
        if sel.guard_used:
            self.stats["guard_used"] += 1
        admitted = []
        for i in np.flatnonzero(sel.kind):
            req = waiting[i]
            kind = CacheKind.KV if sel.kind[i] == KV else CacheKind.HIDDEN
            if not self._try_allocate(req, int(upto[i]), (kind,)):
                continue  # the expected footprint was capped to an idle pool: this chunk still misses
            admitted.append(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq_plan(req, int(tokens[i])))
            self.stats["admitted_kv" if sel.kind[i] == KV else "admitted_hidden"] += 1
            self.stats["violators_admitted"] += int(w_v[i])
        # the pool is short when an attainable request is left waiting that does not fit what is free
        smallest = np.where(hid_blocks > 0, hid_blocks, kv_blocks)
        if (smallest[~w_v & (sel.kind == 0)] > self.blocks.num_free).any():
            self._short_at = self._now
        if len(admitted) > 8:  # one pass instead of a deque.remove (O(queue)) per admission
            taken = set(admitted)
            self.waiting = deque(filterfalse(taken.__contains__, self.waiting))
        else:
            for req in admitted:
                self.waiting.remove(req)
        return seqs

    def _upgrade_room(self, room: int, hidden_value: np.ndarray, value: np.ndarray, final: np.ndarray,
                      violators: np.ndarray) -> int | None:
        """Blocks that hidden -> KV upgrade items may take, counted at the requests' expected end:
        what neither the running set's growth nor the queue's end footprint as hidden (every
        attainable waiting request, admitted now or later) needs. An upgrade only buys step time
        (U * alpha * m_h, often a fraction of a millisecond); the blocks it takes would otherwise
        absorb growth that, once the pool is full, costs a re-prefill as hidden or a preemption."""
        if not (self.kv_on and self.hidden_on) or not (hidden_value < value).any():
            return None  # no upgrade items
        return max(0, room - self._expected_growth() - self._blocks_at_end(final[~violators]))

    def _violator_room(self, room: int, violators: np.ndarray) -> int | None:
        """Blocks that violators may take at admission: what the running set is not expected to need
        for its growth. A violator relieves no pending time that counts; admitted into blocks the
        running set then grows into, it is the first to be dropped again, its (re-)prefill wasted."""
        if not violators.any() or not self.running:
            return None
        return max(0, room - self._expected_growth())

    def _tbt_budget(self, num_decodes: int, hidden_rows: np.ndarray) -> int:
        tables = self.blocks.tables
        hidden = sum(len(tables.get(r.request_id, ())) for r in compress(self.running, hidden_rows))
        kv = self.blocks.num_blocks - self.blocks.num_free - hidden  # only running requests hold blocks
        lost = self.slo.lost  # requests that miss whatever happens size no step
        slos = [r.tbt_slo for r in self.running if r.request_id not in lost] or [self.config.tbt_slo]
        return binding_tbt_budget(self.cost, self.config.max_num_batched_tokens, slos, num_decodes, kv, hidden,
                                  self.blocks.block_size, int(hidden_rows.sum()))
