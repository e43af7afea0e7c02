"""What every policy shares: the waiting and running sets, block bookkeeping, plan building."""
from __future__ import annotations

from collections import Counter, deque
from itertools import filterfalse

from aptray.cache.block_manager import BlockManager, CachedPrefix, OutOfBlocks
from aptray.plan import BatchPlan, ConversionPlan, SeqPlan, StepResult
from aptray.request import CacheKind, Request, RequestStatus
from aptray.sampling_params import InvalidRequest


# (t,) for each token id t, made once: a decode's token_ids without a new tuple per running request
# per step (each allocation counts toward the cyclic GC's next collection)
_ONE_TOKEN: dict[int, tuple[int]] = {}
# SeqPlan(...) goes through the named tuple's Python-level __new__; tuple.__new__ with the fields
# builds the same object without that frame (~150 ns of ~400, once per running request per step)
_new_tuple = tuple.__new__


class Scheduler:
    """Subclasses implement schedule(now) -> BatchPlan; the engine calls update() with the result."""

    # Whether prompts longer than one step's token budget are split over iterations.
    @property
    def chunks_long_prompts(self) -> bool:
        return self.config.enable_chunked_prefill

    def __init__(self, config, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.iteration = 0
        self.stats: Counter = Counter()  # preemptions, conversions_to_kv, conversions_to_hidden, prefix_*
        self._requested_upgrades: list[str] = []
        self._prefix_conversions: list[ConversionPlan] = []  # cached hidden prefixes converted for KV admissions

    # -- request lifecycle -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use", "request_id")
        # refuse what could never fit: growing alone into a full pool, it would preempt itself forever
        most = min(len(req.prompt_token_ids) + req.sampling.max_tokens, self.config.spec.max_model_len)
        kind = self._smallest_kind()
        if self.blocks.blocks_for(most, kind) > self.blocks.num_blocks:
            raise InvalidRequest(f"prompt + max_tokens ({most} tokens) needs more cache than the whole pool holds "
                                 f"({self.blocks.num_blocks} blocks of {self.blocks.tokens_per_block(kind)} tokens)",
                                 "max_tokens")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.blocks.free(req.request_id)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def preempt(self, req: Request) -> None:
        """Send a running request back to the queue by recompute (the engine's failure paths)."""
        self._preempt(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def request_upgrade(self, request_id: str) -> None:
        """Ask for a hidden request to move to KV at the next iteration that has the blocks."""
        self._requested_upgrades.append(request_id)

    # -- policy ------------------------------------------------------------------------------
    def schedule(self, now: float) -> BatchPlan:
        raise NotImplementedError

    def update(self, plan: BatchPlan, result: StepResult, now: float) -> list[Request]:
        """Advance computed tokens, record sampled ones; returns the requests that got a token."""
        got = []
        for seq in plan.seqs:
            req = self.requests.get(seq.request_id)
            if req is None:  # aborted while the step ran
                continue
            req.num_computed_tokens = seq.context_len
            self.blocks.publish(req)
            token = result.sampled.get(seq.request_id)
            if seq.sample and token is not None:
                req.record_token(token, now)
                got.append(req)
        for conv in plan.conversions:  # a conversion without a chunk this step computed its blocks too
            if (req := self.requests.get(conv.request_id)) is not None:
                self.blocks.publish(req)
        self.observe(plan, result)
        return got

    def observe(self, plan: BatchPlan, result: StepResult) -> None:
        """Hook for policies that learn from step times."""

    # -- helpers for policies ----------------------------------------------------------------
    def _smallest_kind(self) -> CacheKind:
        return CacheKind.HIDDEN if self.config.cache_mode != "kv" and self.blocks.hidden_enabled else CacheKind.KV

    def _admission_kinds(self) -> tuple[CacheKind, ...]:
        """Kinds to try for a new request, preferred first."""
        if self.config.cache_mode == "kv" or not self.blocks.hidden_enabled:
            return (CacheKind.KV,)
        if self.config.cache_mode == "hidden":
            return (CacheKind.HIDDEN,)
        return (CacheKind.KV, CacheKind.HIDDEN)

    def _kinds_for(self, req: Request) -> tuple[CacheKind, ...]:
        """_admission_kinds that can hold req's tokens so far in the whole pool. Admitted chunk by
        chunk as KV, a request that only fits as hidden outgrows the pool, is preempted, and comes
        back the same way for ever."""
        kinds = self._admission_kinds()
        fit = tuple(k for k in kinds if not self._outgrows(req, k))
        return fit or kinds

    def _outgrows(self, req: Request, kind: CacheKind) -> bool:
        """req's tokens so far need more blocks of that kind than the whole pool holds."""
        return self.blocks.blocks_for(req.num_tokens, kind) > self.blocks.num_blocks

    def _try_allocate(self, req: Request, num_tokens: int, kinds=None) -> bool:
        """Give req room for num_tokens in the first kind that fits (its own kind once it has one)."""
        kinds = (req.cache_kind,) if req.cache_kind is not None else (kinds or self._admission_kinds())
        for kind in kinds:
            try:
                self.blocks.ensure(req.request_id, kind, num_tokens)
            except OutOfBlocks:
                continue
            req.cache_kind = kind
            return True
        return False

    def _preempt(self, req: Request) -> None:
        """Preempt by recompute: drop its cache; it re-prefills all its tokens when readmitted."""
        self.blocks.free(req.request_id)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.cache_kind = None
        req.num_preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(req)

    def _seq_plan(self, req: Request, num_tokens: int) -> SeqPlan:
        """Plan the next num_tokens uncomputed tokens of req."""
        start = req.num_computed_tokens
        prompt, outputs = req.prompt_token_ids, req.output_token_ids
        n_prompt, n_out = len(prompt), len(outputs)
        # never past its last token: a longer count (a stale length) made a plan that computed all
        # of a re-prefill without sampling, and the request then sat with nothing to compute forever
        num_tokens = min(num_tokens, n_prompt + n_out - start)
        if num_tokens == 1 and start >= n_prompt:  # a decode
            t = outputs[start - n_prompt]
            tokens = _ONE_TOKEN.get(t) or _ONE_TOKEN.setdefault(t, (t,))
        elif start >= n_prompt:  # no need to build the whole sequence
            tokens = tuple(outputs[start - n_prompt:start - n_prompt + num_tokens])
        elif not n_out:
            tokens = tuple(prompt[start:start + num_tokens])
        else:
            tokens = tuple((prompt + outputs)[start:start + num_tokens])
        s = req.sampling
        # the prompt tokens whose log-probabilities this chunk's rows give: positions start + 1 .. (at most
        # the prompt's last), each scored by the row before it
        targets = ()
        if s.prompt_logprobs is not None:
            targets = tuple(prompt[start + 1:min(start + num_tokens + 1, n_prompt)])
        sample = start + num_tokens == n_prompt + n_out
        # every field, in order (_new_tuple applies no defaults)
        return _new_tuple(SeqPlan, (req.request_id, tokens, start, req.cache_kind, self.blocks.table(req.request_id),
                                    sample, s.temperature, s.top_p, s.top_k, s.seed,
                                    n_out, s.min_p, req.step_logit_bias(n_out), s.logprobs,
                                    s.prompt_logprobs if targets else None, targets, s.presence_penalty,
                                    s.frequency_penalty, req.output_counts(), req.allowed_tokens() if sample else b"",
                                    s.repetition_penalty, req.seen_tokens() if sample else ()))

    def _decode_plan(self, req: Request) -> SeqPlan:
        """_seq_plan(req, 1) for a decoding request (only its newest token uncomputed), without the
        branches: built once per running request per step, the hottest line of every policy."""
        out, s = req.output_token_ids, req.sampling
        t = out[-1]
        # the fields from min_p on: fixed for most requests (Request.decode_tail)
        tail = req.decode_tail or (s.min_p, req.step_logit_bias(len(out)), s.logprobs, None, (), s.presence_penalty,
                                   s.frequency_penalty, req.output_counts(), req.allowed_tokens(), s.repetition_penalty,
                                   req.seen_tokens())
        return _new_tuple(SeqPlan, (req.request_id, _ONE_TOKEN.get(t) or _ONE_TOKEN.setdefault(t, (t,)),
                                    req.num_computed_tokens, req.cache_kind, self.blocks.table(req.request_id), True,
                                    s.temperature, s.top_p, s.top_k, s.seed, len(out)) + tail)

    def _convert(self, req: Request, to_kind: CacheKind) -> ConversionPlan | None:
        """Move a running request's computed tokens to to_kind, if the blocks allow: never to KV where
        its tokens so far outgrow the whole pool as KV (moved mid-prefill, it could never go on)."""
        if to_kind is CacheKind.KV and self._outgrows(req, to_kind):
            return None
        try:
            old, new = self.blocks.convert(req.request_id, to_kind, max(req.num_computed_tokens, 1))
        except OutOfBlocks:
            return None
        req.cache_kind = to_kind
        self.stats[f"conversions_to_{to_kind.value}"] += 1
        return ConversionPlan(req.request_id, req.num_computed_tokens, to_kind, tuple(old), tuple(new))

    def _start(self, req: Request, num_tokens: int) -> SeqPlan:
        """Move an admitted request to the running set and plan its first num_tokens (the caller takes
        it out of the queue)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return self._seq_plan(req, num_tokens)

    def _first_chunk(self, req: Request, budget: int, first: bool) -> int:
        """Tokens to admit req with, given the token budget left (0: not now). first: nothing was
        admitted yet this iteration. By default a prompt longer than the budget is chunked."""
        return min(req.num_uncomputed_tokens, budget)

    def _admit_in_order(self, budget: int) -> tuple[list[SeqPlan], int]:
        """Admit from the head of the queue while sequence slots, the token budget and blocks last;
        stops at the first request that does not fit. Returns the plans and the budget left."""
        seqs = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            todo = self._take_first_kind(req, self._kinds_for(req), lambda: self._first_chunk(req, budget, not seqs))
            if todo <= 0:
                break
            self.waiting.popleft()
            seqs.append(self._start(req, todo))
            budget -= todo
        return seqs, budget

    def _take_first_kind(self, req: Request, kinds, first_chunk) -> int:
        """_take_blocks in the first of kinds that fits, each from its cached prefix; where none does,
        KV once more without converting a cached hidden prefix. That prefix is held beside the new KV
        table while it is converted, and may be what does not fit: started afresh, the request evicts
        it instead (else an idle pool whose only cached blocks are that prefix would never admit it)."""
        for kind in kinds:
            todo = self._take_blocks(req, kind, first_chunk)
            if todo:
                return todo
        if CacheKind.KV in kinds and self.blocks.hidden_enabled:
            return self._take_blocks(req, CacheKind.KV, first_chunk, convert=False)
        return 0

    def _take_blocks(self, req: Request, kind: CacheKind, first_chunk, convert: bool = True) -> int:
        """Blocks of that kind for a waiting request: its cached prefix (a KV request's may be a hidden
        one it converts, unless not convert), which counts as computed, and its first chunk of
        first_chunk() tokens (asked once the prefix is known). Returns the chunk; 0: not admitted,
        nothing held."""
        prefix = self.blocks.cached_prefix(req, kind, convert=convert)
        req.num_computed_tokens = prefix.tokens
        todo = first_chunk()
        if todo <= 0 or not self.blocks.allocate(req, kind, prefix, prefix.tokens + todo):
            req.num_computed_tokens = 0
            return 0
        req.cache_kind = kind
        if req.num_cached_tokens is None:
            req.num_cached_tokens = prefix.tokens
        if self.blocks.caching:
            self._count_prefix(req, kind, prefix)
        return todo

    def _count_prefix(self, req: Request, kind: CacheKind, prefix: CachedPrefix) -> None:
        """Hit counters of one admission (blocks in the request's kind); plans a cached hidden prefix's
        conversion into the KV blocks of a KV admission."""
        per = self.blocks.tokens_per_block(kind)
        self.stats["prefix_queried_tokens"] += req.num_tokens
        self.stats["prefix_hit_tokens"] += prefix.tokens
        self.stats["prefix_queried_blocks"] += (req.num_tokens - 1) // per
        self.stats["prefix_hit_blocks"] += prefix.tokens // per
        if prefix.tokens and prefix.source is not kind:
            table = self.blocks.table(req.request_id)
            self._prefix_conversions.append(ConversionPlan(
                req.request_id, prefix.tokens, kind, prefix.blocks, table[:self.blocks.blocks_for(prefix.tokens, kind)]))
            self.stats["prefix_conversions"] += 1

    def _continue_prefills(self, budget: int, at_most: int | None = None,
                           prefix_tokens=None, among=None) -> tuple[list[SeqPlan], int, bool]:
        """The next chunk of each running request mid-prefill, oldest first, while the token budget
        lasts; stops at the first the pool cannot grow (decoding frees room). prefix_tokens(req):
        budget its chunk's cached prefix takes too (apt: a hidden chunk re-projects it), leaving at
        least half the budget to new tokens. among: the running requests that may be mid-prefill, in
        running-set order (default: all of them). Returns the plans, the budget left, and whether one
        was stopped by the pool (then a new admission would take the blocks it waits for)."""
        seqs = []
        for req in self.running if among is None else among:
            if budget <= 0 or (at_most is not None and len(seqs) >= at_most):
                break
            if req.is_prefilling and req.num_computed_tokens > 0:
                extra = prefix_tokens(req) if prefix_tokens is not None else 0
                todo = min(req.num_uncomputed_tokens, max(budget - extra, budget // 2, 1))
                if not self._try_allocate(req, req.num_computed_tokens + todo):
                    return seqs, budget, True
                seqs.append(self._seq_plan(req, todo))
                budget -= todo + extra
        return seqs, budget, False

    def _remove_waiting(self, admitted: list[Request]) -> None:
        """Take admitted requests out of the queue: one pass when many (deque.remove is O(queue))."""
        if len(admitted) > 8:
            taken = set(admitted)
            self.waiting = deque(filterfalse(taken.__contains__, self.waiting))
        else:
            for req in admitted:
                self.waiting.remove(req)

    def _decode_preempting_newest(self):
        """One token for each decoding request, oldest first; when blocks run out, preempt the
        newest by recompute (vLLM 0.5). Victims come from the back, so none was planned yet."""
        seqs, i = [], 0
        while i < len(self.running):
            req = self.running[i]
            if req.is_prefilling:
                i += 1
                continue
            while not self._try_allocate(req, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                seqs.append(self._decode_plan(req))
                i += 1
        return seqs

    def _upgrade_to_kv(self, candidates, reserve: int) -> list[ConversionPlan]:
        """Hidden -> KV (one projection) for candidates in order while `reserve` blocks stay free."""
        out = []
        for req in candidates:
            if self.blocks.num_free - self._upgrade_extra_blocks(req) < reserve:
                break
            conv = self._upgrade(req)
            if conv is None:
                break
            out.append(conv)
        return out

    def _upgrade_extra_blocks(self, req: Request) -> int:
        """Blocks a hidden request takes beyond what it holds once moved to KV."""
        return self.blocks.blocks_for(req.num_tokens, CacheKind.KV) - self.blocks.held_alone(req.request_id)

    def _upgrade(self, req: Request) -> ConversionPlan | None:
        """Hidden -> KV for one request, with room for its next token."""
        conv = self._convert(req, CacheKind.KV)
        if conv is not None:
            self.blocks.ensure(req.request_id, CacheKind.KV, req.num_tokens)
        return conv

    def _requested_conversions(self) -> list[ConversionPlan]:
        out = []
        pending, self._requested_upgrades = self._requested_upgrades, []
        for rid in pending:
            req = self.requests.get(rid)
            if req is not None and self._outgrows(req, CacheKind.KV):
                continue  # it only grows: the request can never be met
            if req is None or req.cache_kind is not CacheKind.HIDDEN or req.num_computed_tokens == 0:
                if req is not None and req.cache_kind is not CacheKind.KV:
                    self._requested_upgrades.append(rid)  # not prefilled yet: try again later
                continue
            conv = self._convert(req, CacheKind.KV)
            if conv is None:
                self._requested_upgrades.append(rid)
            else:
                out.append(conv)
        return out

    def _plan(self, seqs: list[SeqPlan], conversions: list[ConversionPlan] = ()) -> BatchPlan:
        """The iteration's plan. Conversions run in the order their blocks were allocated: admissions'
        prefix conversions come last, as their blocks did (one may write a block an upgrade let go)."""
        self.iteration += 1
        conversions = tuple(conversions)
        if self._prefix_conversions:
            conversions += tuple(self._prefix_conversions)
            self._prefix_conversions = []
        return BatchPlan(self.iteration, tuple(seqs), conversions)
