"""FCFS as vLLM 0.5 does it: prefill first, admit in arrival order while blocks last,
preempt the newest running request by recompute when decoding runs out of blocks."""
from __future__ import annotations

from aptray.request import CacheKind, RequestStatus
from aptray.scheduler.base import Scheduler


class FcfsScheduler(Scheduler):
    def schedule(self, now: float):
        conversions = self._requested_conversions()
        seqs = self._admit()
        if seqs:
            return self._plan(seqs, conversions)
        return self._plan(self._decode(conversions), conversions)

    def _admit(self):
        seqs, budget = [], self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            todo = req.num_uncomputed_tokens
            if todo > budget:
                if not self.config.enable_chunked_prefill or budget == 0 or seqs:
                    break
                todo = budget  # one chunk now, the rest in later prefill iterations
            if not self._try_allocate(req, req.num_computed_tokens + todo):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq_plan(req, todo))
            budget -= todo
        # partially prefilled requests finish their prompt before decoding resumes
        for req in self.running:
            if not seqs and req.is_prefilling and req.num_computed_tokens > 0:
                todo = min(req.num_uncomputed_tokens, budget)
                if not self._try_allocate(req, req.num_computed_tokens + todo):
                    break  # decoding (which preempts) frees room
                seqs.append(self._seq_plan(req, todo))
                budget -= todo
        return seqs

    def _decode(self, conversions):
        if self.config.cache_mode == "hybrid":
            conversions.extend(self._upgrades_that_fit())  # before the plans that name the new blocks
        seqs = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            while not self._try_allocate(req, req.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                seqs.append(self._seq_plan(req, 1))
                i += 1
        return seqs

    def _upgrades_that_fit(self):
        """Hybrid mode: move hidden requests to KV, oldest first, while a block per request stays free."""
        out = []
        for req in self.running:
            if req.cache_kind is CacheKind.HIDDEN and req.num_computed_tokens > 0:
                extra = self.blocks.blocks_for(req.num_tokens, CacheKind.KV) - len(self.blocks.tables[req.request_id])
                if self.blocks.num_free - extra < len(self.running):
                    break
                conv = self._convert(req, CacheKind.KV)
                if conv is None:
                    break
                self.blocks.ensure(req.request_id, CacheKind.KV, req.num_tokens)
                out.append(conv)
        return out
