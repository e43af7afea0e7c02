"""vllm: the default scheduler of vLLM V1 (vllm/v1/core/sched/scheduler.py, Scheduler.schedule), rule
by rule; docs/SCHEDULER.md ("vllm: vLLM V1's default scheduler") cites each rule's code path.

Every step has one token budget, max_num_batched_tokens, that decodes and prefill chunks share:
1. running requests first, in running-set order: each is given the tokens it lacks (one for a
   decode, the rest of its prompt for a partial prefill), cut to the budget left. When its blocks
   cannot be had, the newest running request (the back of the running set) is preempted by
   recompute and goes to the front of the queue, again until the request fits or is itself the one
   preempted; a request that cannot be scheduled ends the running pass.
2. then, unless a request was preempted in this step, the queue from its head while the budget
   lasts and fewer than max_num_seqs run: each is given its uncomputed tokens cut to the budget
   (chunked prefill, always on as in V1); the first whose blocks cannot be had ends admission.
KV cache only (EngineConfig refuses a hidden cache for this policy).
"""
from __future__ import annotations

from aptray.scheduler.base import Scheduler


class VllmScheduler(Scheduler):
    chunks_long_prompts = True  # V1 chunks any prompt longer than the budget left

    def schedule(self, now: float):
        seqs, budget, preempted = self._schedule_running(self.config.max_num_batched_tokens)
        # vLLM skips the queue in a step that preempted; when nothing at all was scheduled (the one
        # running request preempted itself) it would run an empty step and admit in the next: admit now
        if not preempted or not seqs:
            admitted, _ = self._admit_in_order(budget)
            seqs += admitted
        return self._plan(seqs)

    def _schedule_running(self, budget: int):
        """Rule 1. Returns the plans, the budget left and whether anything was preempted."""
        seqs, preempted, i = [], False, 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            todo = min(req.num_uncomputed_tokens, budget)
            if todo <= 0:  # nothing to compute (its last step sampled no token): skip it, as vLLM does
                i += 1
                continue
            while not self._try_allocate(req, req.num_computed_tokens + todo):
                victim = self.running[-1]  # victims come from the back: none was planned yet
                self._preempt(victim)
                preempted = True
                if victim is req:
                    return seqs, budget, preempted
            seqs.append(self._seq_plan(req, todo))
            budget -= todo
            i += 1
        return seqs, budget, preempted
