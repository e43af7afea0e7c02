"""Resuming requests after a fault: re-admit them with their prompt and the tokens they already have.

A resumed request is a recompute preemption: no cache survives, so it waits, re-prefills prompt +
generated tokens and samples the next one with the same sample index. Greedy (and seeded)
outputs are therefore identical to a fault-free run. The router uses this after a shard group
is rebuilt (state from its own memory), after it restarts (state from Redis), and when a client
re-attaches with the tokens it has already seen.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from aptray.engine import Engine
from aptray.sampling_params import SamplingParams


@dataclass
class Resumable:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float  # the engine's clock (monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # engine clock, one per output token
    num_preemptions: int = 0
    prompt: str | None = None
    grammar: object = None  # its compiled structured output, where one is at hand (no compile to resume)


def from_request(req, prompt: str | None = None) -> Resumable:
    """Snapshot of a live engine request (a shard group is being rebuilt under it)."""
    return Resumable(req.request_id, list(req.prompt_token_ids), req.sampling, req.arrival_time,
                     list(req.output_token_ids), list(req.token_times), req.num_preemptions, prompt,
                     req.guide.compiled if req.guide is not None else None)


def from_meta(meta, sampling: SamplingParams) -> Resumable:
    """A request read back from Redis: wall-clock times become engine (monotonic) times. Redis keeps
    only the first and last token times; the ones between are spread evenly (metrics only)."""
    shift = time.monotonic() - time.time()
    n = len(meta.output_token_ids)
    first = meta.first_token_time if meta.first_token_time is not None else meta.arrival_time
    last = meta.last_token_time if meta.last_token_time is not None else first
    times = [first + (last - first) * i / max(1, n - 1) + shift for i in range(n)]
    return Resumable(meta.request_id, list(meta.prompt_token_ids), sampling, meta.arrival_time + shift,
                     list(meta.output_token_ids), times)


def finished(r: Resumable, engine: Engine) -> tuple[str, str] | None:
    """(finish reason, final text) if the tokens it has already end it (its finish was lost with the
    fault): the engine's own stop rules, replayed over them."""
    stops = engine.stop_checker(r.sampling)
    status = stops.replay(r.output_token_ids, len(r.prompt_token_ids))
    if status is None:
        return None
    return status.value, stops.final_text(r.output_token_ids)
