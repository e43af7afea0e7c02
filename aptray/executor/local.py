"""LocalExecutor: one in-process ModelRunner (offline API, tests, single-device serving)."""
from __future__ import annotations

from aptray.config import EngineConfig
from aptray.executor.base import Executor
from aptray.plan import BatchPlan, StepResult
from aptray.worker.model_runner import ModelRunner


class LocalExecutor(Executor):
    """runner: an already built ModelRunner to drive (its model and pool serve several engines in turn,
    as in loadgen.gpu_check's replay); by default one is built from config."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        self.runner = runner or ModelRunner(config)
        self.num_blocks = self.runner.num_blocks

    def execute(self, plan: BatchPlan) -> StepResult:
        return self.runner.execute(plan)
