"""Run a trace through the real Engine and scheduler on virtual time: the simulator's main loop."""
from __future__ import annotations

from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.sim.arrivals import Arrivals
from aptray.sim.cost_model import CostModel
from aptray.sim.decision_time import DecisionClock, decision_cost
from aptray.sim.executor import SimExecutor, VirtualClock
from aptray.sim.fit import HardwareFit
from aptray.sim.hidden_sharding import hidden_is_sharded
from aptray.sim.measured import get_gpu, hardware_for_gpu
from aptray.sim.memory import plan_memory
from aptray.sim.outcomes import (MAX_STEPS_WITHOUT_TOKEN, TOKEN_ID, SimOutcome, SimRequest, SimRun, Turns, apply_result,
                                 certain_miss, finished, sampling_of, scheduler_stats)


def lean_step(engine: Engine, executor: SimExecutor, clock: VirtualClock, outcomes: dict, on_finish) -> bool:
    """Engine.step without the per-token RequestOutput objects nobody reads here: the same scheduler
    calls, executor and stop rule (Engine.check_stop), in the same order. Returns None where no step
    ran, else how many requests got a token."""
    plan = engine.scheduler.schedule(clock.now)
    if plan.is_empty:
        return None
    result = executor.execute(plan)
    return apply_result(engine, plan, result, clock.now, outcomes, on_finish)


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
    lean: step with lean_step (same outcomes as Engine.step, tested; about 30% less CPU per step).
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
            try:
                engine.add_request(r.request_id, turns.prompt(r), sampling_of(r), arrival_time=at)
            except ValueError as e:
                outcomes[r.request_id].status, outcomes[r.request_id].error = "rejected", str(e)
                turns.ended(r.request_id, clock.now)
        if not engine.has_unfinished():
            if arrivals:
                clock.now = arrivals.next_time
            continue
        if lean:
            got = lean_step(engine, executor, clock, outcomes, ended)
        else:
            steps_before = executor.steps
            outs = engine.step()
            for out in outs:
                if out.finished:
                    finished(outcomes[out.request_id], out.metrics.token_times, out.metrics.num_preemptions, ended)
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
                  stopped, executor.steps, executor.busy_time, scheduler_stats(engine.scheduler), executor.num_blocks, stalled,
                  decision_time=executor.decision_time)
