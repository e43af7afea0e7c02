"""SimExecutor: runs no model; prices each plan with the cost model and advances a virtual clock."""
from __future__ import annotations

from dataclasses import dataclass

from aptray.executor.base import Executor
from aptray.plan import BatchPlan, StepResult
from aptray.sim.cost_model import CostModel


@dataclass
class VirtualClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


class SimExecutor(Executor):
    """Every sampled token is `token_id` (pick one that is not EOS, or use ignore_eos)."""

    def __init__(self, cost_model: CostModel, num_blocks: int, clock: VirtualClock, token_id: int = 5):
        self.cost_model = cost_model
        self.num_blocks = num_blocks
        self.clock = clock
        self.token_id = token_id
        self.steps = 0
        self.busy_time = 0.0

    def execute(self, plan: BatchPlan) -> StepResult:
        seqs = [(s.cache_kind, len(s.token_ids), s.start_pos + len(s.token_ids), s.sample) for s in plan.seqs]
        conversions = [(c.to_kind, c.num_tokens) for c in plan.conversions]
        step_time = self.cost_model.step_time(seqs, conversions)
        self.clock.now += step_time
        self.steps += 1
        self.busy_time += step_time
        return StepResult(sampled={s.request_id: self.token_id for s in plan.seqs if s.sample}, step_time=step_time)
