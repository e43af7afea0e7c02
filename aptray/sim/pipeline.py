"""Pipeline-parallel stages on virtual time: when each micro-batch's step runs on each stage, when its
tokens are back on the host, and how much of the stages' time is bubble.

A step of micro-batch b: the host schedules and launches it (the cost model's per-step overhead, one
step at a time), stage 0 computes it when free, its activations (tokens x d, fp16) go to stage 1
(send/recv law fitted to the profiles), stage 1 computes it when free, ... and the last stage's sampled
token ids go back to the host. A stage runs the steps in the order they reach it (its kernels run on
one stream). Stages idle while fewer steps are in flight than stages: the bubble.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aptray.executor.base import Executor
from aptray.plan import BatchPlan, StepResult
from aptray.sim.cost_model import CostModel, StageWork


def own_time(work: StageWork, boundary: float, back: float) -> float:
    """A step's time in an empty pipeline: host, every stage, every boundary, the token ids home."""
    return work.host + sum(work.stages) + boundary * (len(work.stages) - 1) + back


@dataclass
class PipelineTimeline:
    """The stages' and the host's busy times, and what they add up to."""
    num_stages: int
    stage_free: list[float] = field(default_factory=list)  # when each stage finishes what it was given
    stage_busy: list[float] = field(default_factory=list)  # seconds each stage computed
    host_free: float = 0.0  # when the host can schedule the next step
    active: float = 0.0  # seconds with at least one step in flight
    steps: int = 0
    latency: float = 0.0  # summed: host start -> tokens back on the host
    alone: float = 0.0  # summed: what each step would take in an empty pipeline (host + stages + transfers)
    transfers: float = 0.0  # summed seconds of stage-boundary and token-id transfers
    _active_until: float = -math.inf

    def __post_init__(self):
        self.stage_free = [0.0] * self.num_stages
        self.stage_busy = [0.0] * self.num_stages

    def submit(self, now: float, work: StageWork, boundary: float, back: float) -> float:
        """Run one step from now (the host must be free); returns when its tokens are on the host.
        boundary: seconds to send its activations across one stage boundary; back: its token ids home."""
        t = now + work.host
        self.host_free = t
        for s, dur in enumerate(work.stages):
            if s:
                t += boundary
            start = max(t, self.stage_free[s])
            t = self.stage_free[s] = start + dur
            self.stage_busy[s] += dur
        done = t + back
        self.active += max(0.0, done - max(now, self._active_until))
        self._active_until = max(self._active_until, done)
        self.steps += 1
        self.latency += done - now
        self.transfers += boundary * (self.num_stages - 1) + back
        self.alone += own_time(work, boundary, back)
        return done

    def stats(self) -> dict:
        """bubble_share: of the stages' time while any step was in flight, the share they sat idle."""
        n = max(1, self.steps)
        return {"bubble_share": 1.0 - sum(self.stage_busy) / (self.num_stages * self.active) if self.active else 0.0,
                "step_latency_s": self.latency / n, "step_alone_s": self.alone / n,
                "transfer_s_per_step": self.transfers / n, "stage_busy_s": list(self.stage_busy),
                "active_s": self.active, "steps": self.steps}


class PipelineSimExecutor(Executor):
    """Prices a plan per stage (CostModel.plan_stages) and runs it through a PipelineTimeline.

    submit(plan, now) starts a step and says when it ends, so several micro-batches can be in flight.
    The StepResult's step_time is the step's own time, as the shards would report it: host, every stage
    and the transfers, without the waits for stages busy with other micro-batches. That is the gap
    between tokens if every micro-batch ran steps like it (a full pipeline cycles through pp stage
    times), so a scheduler that sizes its steps for the TBT SLO by it keeps the cycle within the SLO.
    Fed the latency with the waits instead, each scheduler's cost model learned the other micro-batches'
    steps as noise and their chunks added up past the SLO (docs/SIMULATOR.md section 10).
    execute() runs one step alone (clock moved to its end).
    """

    def __init__(self, cost_model: CostModel, layers: list[int], num_blocks: int, clock, token_id: int = 5,
                 jitter=(), jitter_seed: int = 0):
        self.cost_model = cost_model
        self.layers = list(layers)
        self.num_blocks = num_blocks
        self.clock = clock
        self.token_id = token_id
        self.timeline = PipelineTimeline(len(self.layers))
        self.steps = 0
        self._jitter = [math.exp(x) for x in jitter]
        self._rng = np.random.default_rng(jitter_seed)

    def price(self, plan: BatchPlan) -> tuple[StageWork, float, float]:
        """The plan's stage work, its activations' time across one boundary, its token ids' time home."""
        work = self.cost_model.plan_stages(plan, self.layers)
        if self._jitter:
            f = self._jitter[int(self._rng.integers(len(self._jitter)))]
            work = work._replace(host=work.host * f, stages=[x * f for x in work.stages])
        if len(self.layers) == 1:
            return work, 0.0, 0.0
        hw, d = self.cost_model.hw, self.cost_model.spec.hidden_size
        return work, hw.send_recv_time(work.tokens * d), hw.send_recv_time(2 * work.sampled)  # int32 ids

    def submit(self, plan: BatchPlan, now: float) -> tuple[float, StepResult]:
        work, boundary, back = self.price(plan)
        done = self.timeline.submit(now, work, boundary, back)
        self.steps += 1
        tok = self.token_id
        return done, StepResult(sampled={s.request_id: tok for s in plan.seqs if s.sample},
                                step_time=own_time(work, boundary, back))

    def execute(self, plan: BatchPlan) -> StepResult:
        done, result = self.submit(plan, max(self.clock.now, self.timeline.host_free))
        self.clock.now = done
        return result
