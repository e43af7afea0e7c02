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
        return self._decode_preempting_newest()

    def _upgrades_that_fit(self):
        """Hybrid mode: move hidden requests to KV, oldest first, while a block per request stays free."""
        hidden = [r for r in self.running if r.cache_kind is CacheKind.HIDDEN and r.num_computed_tokens > 0]
        return self._upgrade_to_kv(hidden, len(self.running))
