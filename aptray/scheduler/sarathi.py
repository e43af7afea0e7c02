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

from aptray.request import RequestStatus
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
        seqs = self._decodes()
        budget = self._budget(len(seqs)) - len(seqs)
        for req in list(self.running):  # partial prefills, oldest first
            if budget <= 0:
                break
            if req.is_prefilling and req in self.running:
                todo = min(req.num_uncomputed_tokens, budget)
                if not self._try_allocate(req, req.num_computed_tokens + todo):
                    break
                seqs.append(self._seq_plan(req, todo))
                budget -= todo
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            todo = min(req.num_uncomputed_tokens, budget)
            if not self._try_allocate(req, req.num_computed_tokens + todo):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq_plan(req, todo))
            budget -= todo
        if not seqs and not conversions and self.running:
            self._preempt(self.running[-1])  # only stuck partial prefills: free the newest
        return self._plan(seqs, conversions)

    def _decodes(self):
        return self._decode_preempting_newest()

    def _budget(self, num_decodes: int) -> int:
        kv = hidden = 0
        for rid, table in self.blocks.tables.items():
            if self.blocks.kinds[rid].value == "hidden":
                hidden += len(table)
            else:
                kv += len(table)
        slos = [r.tbt_slo for r in self.running] or [self.config.tbt_slo]
        self.token_budget = binding_tbt_budget(self.cost, self.config.max_num_batched_tokens, slos, num_decodes,
                                               kv, hidden, self.blocks.block_size)
        return self.token_budget
