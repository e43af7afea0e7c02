"""Sarathi-Serve: decode first, then partial prefills, then new prefills, chunked under a token budget.

The token budget bounds every iteration's length, hence the gap between a decoding request's
tokens. Sarathi-Serve picks it offline from profiling so that an iteration fits the TBT SLO; here
it is learned online: the step-cost model fitted to measured step times predicts the step's time
from its tokens and the blocks its decodes read, and the budget is the most tokens that keep the
prediction within 0.8 x the tightest TBT SLO among the running requests (of those that leave room
for prefills: step_cost.binding_tbt_budget), capped by
max_num_batched_tokens (which is also the budget until the model is calibrated).
Memory runs out: preempt the newest running request by recompute, as vLLM does.
"""
from __future__ import annotations

from aptray.request import CacheKind
from aptray.scheduler.base import Scheduler
from aptray.scheduler.step_cost import StepCostModel, binding_tbt_budget


class SarathiScheduler(Scheduler):
    chunks_long_prompts = True  # chunks whenever a prompt exceeds the step's token budget

    def __init__(self, config, blocks):
        super().__init__(config, blocks)
        self.cost = StepCostModel(blocks.block_size, blocks.hidden_block_size)
        self.token_budget = config.max_num_batched_tokens  # the last budget used, for metrics

    def observe(self, plan, result) -> None:
        self.cost.observe(plan, result.step_time)

    def schedule(self, now: float):
        conversions = self._requested_conversions()
        seqs = self._decode_preempting_newest()
        budget = self._budget(len(seqs)) - len(seqs)
        partial, budget, blocked = self._continue_prefills(budget)
        # none admitted while a partial prefill waits for blocks (fcfs: the same rule, and why)
        admitted = [] if blocked else self._admit_in_order(budget)[0]
        seqs += partial + admitted
        if not seqs and not conversions and self.running:
            self._preempt(self.running[-1])  # only stuck partial prefills: free the newest
        return self._plan(seqs, conversions)

    def _budget(self, num_decodes: int) -> int:
        slos = [r.tbt_slo for r in self.running] or [self.config.tbt_slo]
        self.token_budget = binding_tbt_budget(self.cost, self.config.max_num_batched_tokens, slos, num_decodes,
                                               self.blocks.held_by(CacheKind.KV), self.blocks.held_by(CacheKind.HIDDEN),
                                               self.blocks.block_size)
        return self.token_budget
