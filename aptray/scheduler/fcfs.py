"""FCFS as vLLM 0.5 does it: prefill first, admit in arrival order while blocks last,
preempt the newest running request by recompute when decoding runs out of blocks."""
from __future__ import annotations

from aptray.request import CacheKind
from aptray.scheduler.base import Scheduler


class FcfsScheduler(Scheduler):
    def schedule(self, now: float):
        conversions = self._requested_conversions()
        seqs = self._admit()
        if seqs:
            return self._plan(seqs, conversions)
        seqs = self._decode(conversions)
        if not seqs and not conversions and self.running:
            # only partial prefills are left and the pool has no room for their next chunks: none can
            # move until one goes (seen: two half-prefilled prompts holding a full pool, forever)
            self._preempt(self.running[-1])
        return self._plan(seqs, conversions)

    def _first_chunk(self, req, budget: int, first: bool) -> int:
        """Whole prompts; with chunked prefill on, a longer one is chunked only as the first admission.
        So is, always, a request back from a preemption whose prompt and outputs no step holds whole
        (the engine refuses such prompts without chunked prefill; unchunked, it would wait for ever)."""
        todo = req.num_uncomputed_tokens
        if todo <= budget:
            return todo
        chunkable = self.config.enable_chunked_prefill or todo > self.config.max_num_batched_tokens
        return budget if chunkable and first else 0

    def _admit(self):
        # a partially prefilled request goes on before new ones start: admitted first, they took every
        # block it freed and it never finished (seen with chunked prefill in a full pool)
        seqs, budget, blocked = self._continue_prefills(self.config.max_num_batched_tokens, at_most=1)
        if blocked:
            # nor does a new one take the blocks it waits for: then neither can go on, and the newest is
            # preempted and readmitted in turn for ever (seen with chunked prefill in a 19-block pool)
            return seqs
        more, _ = self._admit_in_order(budget) if budget > 0 else ([], 0)
        return seqs + more

    def _decode(self, conversions):
        if self.config.cache_mode == "hybrid":
            conversions.extend(self._upgrades_that_fit())  # before the plans that name the new blocks
        return self._decode_preempting_newest()

    def _upgrades_that_fit(self):
        """Hybrid mode: move hidden requests to KV, oldest first, while a block per request stays free."""
        hidden = [r for r in self.running if r.cache_kind is CacheKind.HIDDEN and r.num_computed_tokens > 0]
        return self._upgrade_to_kv(hidden, len(self.running))
