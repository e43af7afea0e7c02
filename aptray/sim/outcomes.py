"""What a simulated run takes and gives (SimRequest, SimOutcome, SimRun), and the bookkeeping every
simulation loop shares (aptray.sim.runner, pipeline_runner, cluster): a request handed to the engine,
a step's tokens applied, a conversation's turns handed over, a request already past its SLO."""
from __future__ import annotations

from dataclasses import dataclass, field

from aptray.engine import Engine
from aptray.sampling_params import SamplingParams
from aptray.slo import slow_gaps_to_miss
from aptray.sim.arrivals import Arrivals
from aptray.sim.prompt_ids import follow_up_ids, prompt_ids

TOKEN_ID = 5  # what every simulated step samples: any id that is not a special token
# Steps in a row without a token before a run is called stalled. A healthy engine samples whenever a
# prefill completes, so a tokenless run is bounded by one context over the chunk budget (~100 steps);
# a scheduler fault that plans nothing useful would otherwise spin for hours of CPU.
MAX_STEPS_WITHOUT_TOKEN = 20_000


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_time: float  # of a follow-up (after), unused: it arrives think_time after `after` ends
    prompt_len: int
    output_len: int
    ttft_slo: float | None = None
    tbt_slo: float | None = None
    # token content (aptray.sim.prompt_ids): the first prompt_len ids of content_key's stream (default:
    # the request id's), the first shared_prefix of them shared by every request
    content_key: str | None = None
    shared_prefix: int = 0
    after: str | None = None  # a closed loop: sent when this request ends (finished or refused) ...
    think_time: float = 0.0  # ... plus this many seconds


@dataclass
class SimOutcome:
    request_id: str
    arrival_time: float
    status: str  # "finished", "rejected" (the engine refused it) or "unfinished" (the run stopped first)
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    error: str | None = None


@dataclass
class SimRun:
    outcomes: list[SimOutcome]
    sim_time: float  # virtual seconds from the first arrival to the last step
    stopped_early: bool
    steps: int
    busy_time: float
    scheduler_stats: dict
    num_blocks: int
    stalled: bool = False  # stopped by MAX_STEPS_WITHOUT_TOKEN: a scheduler fault, not a result
    pipeline: dict | None = None  # pp > 1: stages, blocks per stage, bubble share, step latency (sim.pipeline)
    decision_time: float = 0.0  # virtual seconds charged for the scheduler's decisions (in sim_time, not busy_time)


def certain_miss(req, now: float) -> bool:
    """Whether req already misses its SLO whatever happens next (aptray.slo: TTFT, then the P99 of its
    max_tokens - 1 gaps)."""
    if req.first_token_time is None:
        return now - req.arrival_time > req.ttft_slo
    if req.first_token_time - req.arrival_time > req.ttft_slo:
        return True
    n = req.sampling.max_tokens - 1
    if n < 1:
        return False
    times, slo = req.token_times, req.tbt_slo
    m = sum(1 for a, b in zip(times, times[1:]) if b - a > slo) + (now - times[-1] > slo)
    return m >= slow_gaps_to_miss(n)


def scheduler_stats(scheduler) -> dict:
    """The scheduler's counters, and its last price of the hidden cache where it learns one."""
    out = dict(scheduler.stats)
    if hasattr(scheduler, "alpha"):
        out["alpha"] = scheduler.alpha
        out["hidden_decode_cost"] = scheduler.cost.hidden_decode_cost
        out["hidden_step_cost"] = scheduler.cost.hidden_step_cost
    return out


def finished(o: SimOutcome, token_times, num_preemptions: int, on_finish) -> None:
    o.status = "finished"
    o.token_times = list(token_times)
    o.num_preemptions = num_preemptions
    if on_finish is not None:
        on_finish(o)


def apply_result(engine: Engine, plan, result, now: float, outcomes: dict, on_finish) -> int:
    """A finished step's tokens into the scheduler, and requests that end with them finished (Engine.step's
    postprocess). Returns how many requests got a token."""
    scheduler = engine.scheduler
    got = scheduler.update(plan, result, now)
    for req in got:
        status = engine.check_stop(req)
        if status is not None:
            scheduler.finish(req, status)
            engine._forget(req.request_id)
            finished(outcomes[req.request_id], req.token_times, req.num_preemptions, on_finish)
    return len(got)


def request_prompt(r: SimRequest) -> list[int]:
    """r's token content (aptray.sim.prompt_ids): its own stream, or its conversation's, so prefix
    caching finds exactly the prefixes the workload shares."""
    return prompt_ids(r.content_key or r.request_id, r.prompt_len, r.shared_prefix)


class Turns:
    """The closed loop's hand-over between a conversation's turns (shared by the single- and
    multi-replica loops): an arriving turn's prompt is what was said before it, then its own stream
    (follow_up_ids); a turn that ends hands its prompt and reply (the executor's one token, as many as
    it got) to its follow-ups, which come think_time later (Arrivals)."""

    def __init__(self, arrivals: Arrivals):
        self.arrivals = arrivals
        self._followed: dict[str, list[int]] = {}  # prompts of requests a follow-up waits on

    def prompt(self, r: SimRequest) -> list[int]:
        prompt = follow_up_ids(request_prompt(r), self.arrivals.said_before(r.request_id))
        if self.arrivals.is_followed(r.request_id):
            self._followed[r.request_id] = prompt
        return prompt

    def ended(self, request_id: str, now: float, num_tokens: int | None = None) -> None:
        """The request ended at now with num_tokens of reply (None: refused, nothing to resend)."""
        prompt = self._followed.pop(request_id, None)
        said = None if prompt is None or num_tokens is None else prompt + [TOKEN_ID] * num_tokens
        self.arrivals.ended(request_id, now, said)


def sampling_of(r: SimRequest) -> SamplingParams:
    """What r asks of the engine: exactly output_len greedy tokens, with its SLOs."""
    return SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True,
                          ttft_slo=r.ttft_slo, tbt_slo=r.tbt_slo)


def add_request(engine: Engine, r: SimRequest, outcomes: dict) -> None:
    """Hand r to the engine (its prompt: request_prompt); a refusal is its outcome."""
    outcomes[r.request_id] = SimOutcome(r.request_id, r.arrival_time, "unfinished")
    try:
        engine.add_request(r.request_id, request_prompt(r), sampling_of(r), arrival_time=r.arrival_time)
    except ValueError as e:
        outcomes[r.request_id].status, outcomes[r.request_id].error = "rejected", str(e)
