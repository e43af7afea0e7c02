"""The simulator's loop for pipeline parallelism: pp micro-batches in flight, each with its own scheduler.

As vLLM's virtual engines: pipeline_parallel_size Engines, each running the real scheduler over the
requests it was given (a new request goes to the one with the fewest unfinished, and stays there),
each with at most one step in flight. They share one block pool (aptray.cache.block_views; vLLM 0.5
splits it in pp fixed parts instead). A request therefore gets one token per pipeline traversal of its
micro-batch: its TBT includes every stage. The host schedules one step at a time, the micro-batch
that has waited longest first; PipelineSimExecutor says when each step ends. The views keep no
prefix cache (a cached block would have to be shared across micro-batches' schedulers).
"""
from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import replace

from aptray.cache.block_views import SharedBlockPool
from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.sim.arrivals import Arrivals
from aptray.sim.cost_model import CostModel
from aptray.sim.decision_time import DecisionClock, decision_cost
from aptray.sim.executor import VirtualClock
from aptray.sim.fit import HardwareFit, hardware_for
from aptray.sim.hidden_sharding import hidden_is_sharded
from aptray.sim.measured import get_gpu
from aptray.sim.memory import stage_memory
from aptray.sim.outcomes import (MAX_STEPS_WITHOUT_TOKEN, TOKEN_ID, SimOutcome, SimRequest, SimRun, add_request,
                                 apply_result, certain_miss)
from aptray.sim.pipeline import PipelineSimExecutor


def build_pipeline(config: EngineConfig, gpu: str, step_overhead: float = 1e-3,
                   hardware: HardwareFit | None = None, decision_scale: float | None = 1.0
                   ) -> tuple[list[Engine], PipelineSimExecutor, list, list]:
    """pp Engines over views of one shared pool, the executor pricing their steps, each stage's
    memory plan, and each engine's decision time (aptray.sim.decision_time; None where not charged).
    The pool is the stage with the fewest blocks (a block id names the same tokens on every stage)
    unless config fixes it."""
    spec, tp, pp = config.spec, config.tensor_parallel_size, config.pipeline_parallel_size
    gpu_spec = get_gpu(gpu)
    sharded = hidden_is_sharded(config)
    plans = stage_memory(spec, gpu_spec, tp, pp, config.block_size, config.max_num_batched_tokens,
                         config.max_num_seqs, sharded_hidden=sharded)
    num_blocks = config.num_cache_blocks or min(p.num_blocks for p in plans)
    hw = hardware or hardware_for(gpu_spec)
    cost = CostModel(spec, hw, tp, config.hidden_attention, step_overhead, hw.seq_overhead, sharded,
                     ragged_overhead=hw.ragged_overhead)
    clock = VirtualClock()
    executor = PipelineSimExecutor(cost, spec.layers_of_stages(pp), num_blocks, clock, TOKEN_ID, hw.step_jitter)
    pool = SharedBlockPool(num_blocks)
    hidden = config.hidden_block_size if config.cache_mode != "kv" else 0
    engines = [Engine(config, executor, tokenizer=None, clock=clock, blocks=pool.view(config.block_size, hidden))
               for _ in range(pp)]
    decisions = [None if decision_scale is None else DecisionClock(decision_cost(config, decision_scale), e.scheduler)
                 for e in engines]
    return engines, executor, plans, decisions


def _stats(engines: list[Engine]) -> dict:
    """The micro-batch schedulers' counters summed; their learned price of hidden, averaged."""
    total = Counter()
    for e in engines:
        total.update(e.scheduler.stats)
    out = dict(total)
    alphas = [e.scheduler.alpha for e in engines if hasattr(e.scheduler, "alpha")]
    if alphas:
        out["alpha"] = sum(alphas) / len(alphas)
        out["alpha_by_microbatch"] = alphas
    return out


def simulate_pipeline(config: EngineConfig, requests: list[SimRequest], gpu: str = "a100-40gb",
                      step_overhead: float = 1e-3, max_sim_time: float | None = None, on_finish=None,
                      stop_when_decided: bool = False, check_every: int = 256,
                      hardware: HardwareFit | None = None, decision_scale: float | None = 1.0) -> SimRun:
    """aptray.sim.runner.simulate for config.pipeline_parallel_size >= 1 (same arguments, same outcome rules).
    A micro-batch's step starts once the host has made its plan (its decision time). Follow-ups come
    think_time after the turn they follow ends (no stage keeps a prefix cache: what they resend is
    only their length)."""
    engines, executor, plans, decisions = build_pipeline(config, gpu, step_overhead, hardware, decision_scale)
    decision_time = 0.0
    clock, timeline = executor.clock, executor.timeline
    reqs = sorted(requests, key=lambda r: r.arrival_time)
    arrivals = Arrivals(reqs)
    outcomes: dict[str, SimOutcome] = {}
    in_flight: list = []  # heap of (done, order, micro-batch, plan, result)
    busy: set[int] = set()
    free_since = [0.0] * len(engines)
    events = tokenless = 0
    now = clock.now = arrivals.next_time if arrivals else 0.0
    start = now

    def ended(o: SimOutcome) -> None:
        arrivals.ended(o.request_id, clock.now)
        if on_finish is not None:
            on_finish(o)
    stopped = stalled = False
    while True:
        while in_flight and in_flight[0][0] <= now:  # steps ending now: their tokens, in the order they end
            done, _, v, plan, result = heapq.heappop(in_flight)
            clock.now = done
            got = apply_result(engines[v], plan, result, done, outcomes, ended)
            tokenless = tokenless + 1 if got == 0 else 0
            busy.discard(v)
            free_since[v] = done
        clock.now = now
        if tokenless >= MAX_STEPS_WITHOUT_TOKEN:
            stopped = stalled = True
            break
        if max_sim_time is not None and now - start > max_sim_time:
            stopped = True
            break
        for at, r in arrivals.pop_due(now):
            target = min(engines, key=lambda e: len(e.scheduler.requests))  # vLLM: fewest unfinished
            with target.blocks.whole_pool():  # refuse only what could never fit the pool
                add_request(target, replace(r, arrival_time=at), outcomes)
            if outcomes[r.request_id].status == "rejected":
                arrivals.ended(r.request_id, now)
        all_sent = not arrivals and not arrivals.waiting_on_others
        waiting = [v for v, e in enumerate(engines) if v not in busy and e.has_unfinished()]
        if all_sent and not waiting and not in_flight:
            break
        events += 1
        if (stop_when_decided and all_sent and events % check_every == 0
                and all(certain_miss(r, now) for e in engines for r in e.scheduler.requests.values())):
            stopped = True
            break
        untried = waiting  # micro-batches with work the host has not got to at this time
        if timeline.host_free <= now:
            order = sorted(waiting, key=lambda v: (free_since[v], v))  # the longest idle first
            untried = []
            for k, v in enumerate(order):
                plan = engines[v].scheduler.schedule(now)
                if not plan.is_empty:
                    decided = decisions[v]() if decisions[v] is not None else 0.0
                    decision_time += decided
                    done, result = executor.submit(plan, now + decided)
                    heapq.heappush(in_flight, (done, executor.steps, v, plan, result))
                    busy.add(v)
                    untried = order[k + 1:]  # the host is busy launching it: the others go after
                    break
        nxt = [in_flight[0][0]] if in_flight else []
        if arrivals:
            nxt.append(arrivals.next_time)
        if untried:
            nxt.append(timeline.host_free)
        if not nxt:
            break  # nothing in flight, no arrivals left, and no micro-batch can plan a step: the rest stay unfinished
        now = max(now, min(nxt))
    clock.now = max(now, clock.now)
    for e in engines:  # unfinished: keep what they produced
        for req in e.scheduler.requests.values():
            o = outcomes[req.request_id]
            o.token_times, o.num_preemptions = list(req.token_times), req.num_preemptions
    for r in arrivals.never_sent():
        outcomes[r.request_id] = SimOutcome(r.request_id, clock.now, "unfinished")
    pipeline = {"stages": config.pipeline_parallel_size, "tp": config.tensor_parallel_size,
                "layers": executor.layers, "blocks_per_stage": [p.num_blocks for p in plans],
                **timeline.stats()}
    return SimRun([outcomes[r.request_id] for r in reqs if r.request_id in outcomes], clock.now - start, stopped,
                  executor.steps, sum(timeline.stage_busy) / len(executor.layers), _stats(engines),
                  executor.num_blocks, stalled, pipeline, decision_time)
