"""Run a trace through the real Engine and scheduler on virtual time: the simulator's main loop."""
from __future__ import annotations

from dataclasses import dataclass, field

from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.sampling_params import SamplingParams
from aptray.slo import slow_gaps_to_miss
from aptray.sim.arrivals import Arrivals
from aptray.sim.cost_model import CostModel
from aptray.sim.decision_time import DecisionClock, decision_cost
from aptray.sim.executor import SimExecutor, VirtualClock
from aptray.sim.fit import HardwareFit
from aptray.sim.gpus import get_gpu
from aptray.sim.measured import hardware_for_gpu
from aptray.sim.prompt_ids import follow_up_ids, prompt_ids
from aptray.sim.memory import plan_memory

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


def _stats(scheduler) -> dict:
    """The scheduler's counters, and its last price of the hidden cache where it learns one."""
    out = dict(scheduler.stats)
    if hasattr(scheduler, "alpha"):
        out["alpha"] = scheduler.alpha
        out["hidden_decode_cost"] = scheduler.cost.hidden_decode_cost
    return out


def _finished(o: SimOutcome, token_times, num_preemptions: int, on_finish) -> None:
    o.status = "finished"
    o.token_times = list(token_times)
    o.num_preemptions = num_preemptions
    if on_finish is not None:
        on_finish(o)


def _lean_step(engine: Engine, executor: SimExecutor, clock: VirtualClock, outcomes: dict, on_finish) -> bool:
    """Engine.step without the per-token RequestOutput objects nobody reads here: the same scheduler
    calls, executor and stop rule (Engine.check_stop), in the same order. Returns None where no step
    ran, else how many requests got a token."""
    plan = engine.scheduler.schedule(clock.now)
    if plan.is_empty:
        return None
    result = executor.execute(plan)
    return apply_result(engine, plan, result, clock.now, outcomes, on_finish)


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
            _finished(outcomes[req.request_id], req.token_times, req.num_preemptions, on_finish)
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


def add_request(engine: Engine, r: SimRequest, outcomes: dict) -> None:
    """Hand r to the engine (its prompt: request_prompt); a refusal is its outcome."""
    outcomes[r.request_id] = SimOutcome(r.request_id, r.arrival_time, "unfinished")
    prompt = request_prompt(r)
    sp = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True,
                        ttft_slo=r.ttft_slo, tbt_slo=r.tbt_slo)
    try:
        engine.add_request(r.request_id, prompt, sp, arrival_time=r.arrival_time)
    except ValueError as e:
        outcomes[r.request_id].status, outcomes[r.request_id].error = "rejected", str(e)


def shard_hidden(config: EngineConfig, cache_mode: str = "hybrid") -> EngineConfig:
    """Turn on the sharded hidden cache (docs/ARCHITECTURE.md section 2) for a TP >= 2 config (simulator only).

    With t ranks each stores d/t of every hidden vector, so r per rank is d/t / (2*n_kv*D/t), the same as
    at t = 1, where the replicated vector (r per rank = d / (2*n_kv*D/t)) made the engine turn hidden off.
    The simulator prices the sharded attention and its collectives (CostModel.hidden_sharded) and the
    extra W_k, W_v column slices (memory.sharded_hidden_extra_weights). The engine's kernels for it exist
    (aptray/model/sharded_hidden.py) but the serving engine does not use them.
    """
    spec, tp = config.spec, config.tensor_parallel_size
    if tp < 2 or cache_mode == "kv":
        return config
    r = spec.hidden_size / tp / spec.kv_elems_per_token(tp)
    if r >= 1:  # GQA/MQA: even sharded, hidden costs more than KV
        return config
    config.cache_mode = cache_mode
    config.hidden_block_size = int(config.block_size / r)
    return config


def hidden_is_sharded(config: EngineConfig) -> bool:
    """Hidden cache on at TP >= 2: only shard_hidden does that, the replicated form is always off there."""
    return config.tensor_parallel_size > 1 and config.cache_mode != "kv" and config.hidden_block_size > 0


def build_engine(config: EngineConfig, gpu: str, step_overhead: float = 1e-3,
                 hardware: HardwareFit | None = None, decision_scale: float | None = 1.0) -> tuple[Engine, SimExecutor]:
    """An Engine over a SimExecutor; the pool is sized by the memory model unless config fixes it.
    hardware: coefficients to price steps with instead of gpu's (a CPU calibration); without it, gpu's
    measured profile where one exists (its fitted step overhead replaces step_overhead), else the vidur fit.
    decision_scale: each step also costs the policy's measured decision time times this
    (aptray.sim.decision_time); None: only step_overhead, the same for every policy."""
    spec, tp = config.spec, config.tensor_parallel_size
    sharded = hidden_is_sharded(config)
    hw, num_blocks = hardware, config.num_cache_blocks
    if hw is None or not num_blocks:  # what the GPU decides: its prices, its memory
        gpu_spec = get_gpu(gpu)
        if hw is None:
            hw, step_overhead = hardware_for_gpu(gpu_spec, step_overhead)
        num_blocks = num_blocks or plan_memory(
            spec, gpu_spec, tp, config.block_size, config.max_num_batched_tokens, config.max_num_seqs,
            sharded_hidden=sharded).num_blocks
    cost = CostModel(spec, hw, tp, config.hidden_attention, step_overhead, hw.seq_overhead, sharded,
                     ragged_overhead=hw.ragged_overhead)
    clock = VirtualClock()
    executor = SimExecutor(cost, num_blocks, clock, TOKEN_ID, hw.step_jitter)
    engine = Engine(config, executor, tokenizer=None, clock=clock)
    if decision_scale is not None:
        executor.decision = DecisionClock(decision_cost(config, decision_scale), engine.scheduler)
    return engine, executor


def simulate(config: EngineConfig, requests: list[SimRequest], gpu: str = "a100-40gb", step_overhead: float = 1e-3,
             max_sim_time: float | None = None, on_finish=None, stop_when_decided: bool = False,
             check_every: int = 256, hardware: HardwareFit | None = None, lean: bool = True,
             decision_scale: float | None = 1.0) -> SimRun:
    """Replay requests (by arrival; follow-ups when the request they follow ends) until all finish, or
    until max_sim_time virtual seconds.

    stop_when_decided: after the last arrival, stop as soon as every request left is a certain SLO
    miss (checked every check_every steps). SLO attainment and the attained set are then exact;
    the requests left are reported "unfinished" with the tokens they had (and follow-ups never sent
    "unfinished" with no token).
    lean: step with _lean_step (same outcomes as Engine.step, tested; about 30% less CPU per step).
    decision_scale: as build_engine's.
    config.pipeline_parallel_size > 1: several micro-batches in flight (aptray.sim.pipeline_runner).
    """
    if config.pipeline_parallel_size > 1:
        from aptray.sim.pipeline_runner import simulate_pipeline
        return simulate_pipeline(config, requests, gpu, step_overhead, max_sim_time, on_finish,
                                 stop_when_decided, check_every, hardware, decision_scale)
    engine, executor = build_engine(config, gpu, step_overhead, hardware, decision_scale)
    clock = executor.clock
    arrivals = Arrivals(requests)
    turns = Turns(arrivals)
    outcomes: dict[str, SimOutcome] = {}

    def ended(o: SimOutcome) -> None:
        turns.ended(o.request_id, clock.now, len(o.token_times))
        if on_finish is not None:
            on_finish(o)
    clock.now = arrivals.next_time if arrivals else 0.0
    start = clock.now
    stopped = stalled = False
    tokenless = 0
    while arrivals or engine.has_unfinished():
        if max_sim_time is not None and clock.now - start > max_sim_time:
            stopped = True
            break
        if (stop_when_decided and not arrivals and not arrivals.waiting_on_others
                and executor.steps % check_every == 0
                and all(certain_miss(r, clock.now) for r in engine.scheduler.requests.values())):
            stopped = True
            break
        for at, r in arrivals.pop_due(clock.now):
            outcomes[r.request_id] = SimOutcome(r.request_id, at, "unfinished")
            prompt = turns.prompt(r)
            sp = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True,
                                ttft_slo=r.ttft_slo, tbt_slo=r.tbt_slo)
            try:
                engine.add_request(r.request_id, prompt, sp, arrival_time=at)
            except ValueError as e:
                outcomes[r.request_id].status, outcomes[r.request_id].error = "rejected", str(e)
                turns.ended(r.request_id, clock.now)
        if not engine.has_unfinished():
            if arrivals:
                clock.now = arrivals.next_time
            continue
        if lean:
            got = _lean_step(engine, executor, clock, outcomes, ended)
        else:
            steps_before = executor.steps
            outs = engine.step()
            for out in outs:
                if out.finished:
                    _finished(outcomes[out.request_id], out.metrics.token_times, out.metrics.num_preemptions, ended)
            got = len(outs) if executor.steps != steps_before else None
        tokenless = tokenless + 1 if got == 0 else 0
        if tokenless >= MAX_STEPS_WITHOUT_TOKEN:
            stopped = stalled = True
            break
        if got is None:  # nothing could run: wait for the next arrival
            if not arrivals:
                break  # stuck with no arrivals left: the rest stay unfinished
            clock.now = max(clock.now, arrivals.next_time)
    for req in list(engine.scheduler.requests.values()):  # unfinished: keep what they produced
        o = outcomes[req.request_id]
        o.token_times, o.num_preemptions = list(req.token_times), req.num_preemptions
    for r in arrivals.never_sent():
        outcomes[r.request_id] = SimOutcome(r.request_id, clock.now, "unfinished")
    return SimRun([outcomes[r.request_id] for r in sorted(requests, key=lambda r: r.arrival_time)], clock.now - start,
                  stopped, executor.steps, executor.busy_time, _stats(engine.scheduler), executor.num_blocks, stalled,
                  decision_time=executor.decision_time)
