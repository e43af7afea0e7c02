"""Executor: runs one BatchPlan on the model shards and returns sampled tokens and step time.

LocalExecutor (in-process), RayExecutor (shard actors over gRPC) and the simulator's cost-model
executor implement it; the engine never knows which one it drives.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from aptray.plan import BatchPlan, StepResult


class Executor(ABC):
    num_blocks: int  # physical cache blocks per layer, fixed after start-up

    @abstractmethod
    def execute(self, plan: BatchPlan) -> StepResult:
        ...

    def shutdown(self) -> None:
        pass
