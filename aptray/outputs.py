"""What generate() and the engine's step() hand back (vLLM's shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # while running: the request's live list (copy it to keep it)
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None  # on the finished output only
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by this step (streaming)
