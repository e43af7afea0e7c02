"""SimExecutor: runs no model; prices each plan with the cost model and advances a virtual clock."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aptray.executor.base import Executor
from aptray.plan import BatchPlan, StepResult
from aptray.sim.cost_model import CostModel


@dataclass
class VirtualClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


class SimExecutor(Executor):
    """Every sampled token is `token_id` (pick one that is not EOS, or use ignore_eos).

    jitter: log ratios of measured step times to their typical value (a CPU calibration's); each step's
    price is multiplied by exp(one of them), drawn by a generator seeded with jitter_seed, so runs stay
    deterministic. Empty: every step costs exactly the cost model's price.

    decision: () -> seconds the scheduler took to make the plan (aptray.sim.decision_time), charged to
    the clock before the step; the step's own time (what the scheduler is told) leaves it out, as the
    real engine's does. None: no decision time.
    """

    def __init__(self, cost_model: CostModel, num_blocks: int, clock: VirtualClock, token_id: int = 5,
                 jitter=(), jitter_seed: int = 0):
        self.cost_model = cost_model
        self.num_blocks = num_blocks
        self.clock = clock
        self.token_id = token_id
        self.steps = 0
        self.busy_time = 0.0
        self.decision = None
        self.decision_time = 0.0  # seconds charged for decisions
        self._jitter = [math.exp(x) for x in jitter]
        self._rng = np.random.default_rng(jitter_seed)

    def execute(self, plan: BatchPlan) -> StepResult:
        if self.decision is not None:
            decided = self.decision()
            self.clock.now += decided
            self.decision_time += decided
        step_time = self.cost_model.plan_time(plan)
        if self._jitter:
            step_time *= self._jitter[int(self._rng.integers(len(self._jitter)))]
        self.clock.now += step_time
        self.steps += 1
        self.busy_time += step_time
        tok = self.token_id
        return StepResult(sampled={s.request_id: tok for s in plan.seqs if s.sample}, step_time=step_time)
