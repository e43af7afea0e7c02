"""Several replicas on one virtual clock: the simulator's multi-replica mode.

Each replica is exactly what a single-replica run simulates (runner.build_engine: the real Engine
and scheduler over a SimExecutor with its own VirtualClock, stepped by runner.lean_step). This
module only decides which replica steps next (the one whose clock is earliest; an arrival first
when it comes no later) and where each arriving request goes:

- "p2c", Serve's default router: two random replicas, the one with fewer requests in flight
  (exact and current here; Serve probes or caches live queue lengths);
- "slo", aptray's request router: routing_policy.rank on each replica's load
  (ttft_estimate.LoadTracker), the same code the served router runs, with the staleness it has
  there: loads are snapshotted every stats_period_s of virtual time and seen stats_lag_s later,
  and the router adds what it sent each replica since. A conversation's turns name its prefix
  (the tag of SimRequest.content_key, as loadgen's clients send the conversation id), which the
  replica that admitted one reports while it holds it cached (prefix_holders.py).

Follow-up turns (SimRequest.after) come think_time after the turn they follow ends and resend its
prompt and reply, as in the single-replica simulation (aptray.sim.arrivals, runner.simulate).

With shed_unmeetable a replica refuses a request whose predicted TTFT on its own current load
misses the request's TTFT SLO, as the served replica's admission does (router.py).
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from aptray.config import EngineConfig
from aptray.serve.prefix_key import prefix_tag
from aptray.serve.routing_policy import STALE, RequestHint, SentLog, rank
from aptray.serve.ttft_estimate import LoadTracker, predict_ttft
from aptray.sim.arrivals import Arrivals
from aptray.sim.fit import HardwareFit
from aptray.sim.outcomes import (MAX_STEPS_WITHOUT_TOKEN, SimOutcome, SimRequest, SimRun, Turns, certain_miss,
                                 sampling_of, scheduler_stats)
from aptray.sim.runner import build_engine, lean_step

ROUTINGS = ("p2c", "slo")
SHED = "shed"  # a request refused by shed_unmeetable (routed count key)


class _Observed:
    """The replica's executor, telling its LoadTracker what each step ran and cost."""

    def __init__(self, executor, tracker: LoadTracker):
        self.inner, self.tracker = executor, tracker

    def execute(self, plan):
        result = self.inner.execute(plan)
        self.tracker.on_step(plan, result.step_time)
        return result


class _Replica:
    def __init__(self, config: EngineConfig, gpu: str, step_overhead: float, hardware: HardwareFit | None,
                 decision_scale: float | None):
        self.engine, self.executor = build_engine(config, gpu, step_overhead, hardware, decision_scale)
        self.clock = self.executor.clock
        self.tracker = LoadTracker(config)
        self.observed = _Observed(self.executor, self.tracker)
        self.stuck = False  # waiting requests that cannot start, and nothing running: only an arrival helps
        self.tokenless = 0
        self.admitted = 0

    @property
    def busy(self) -> bool:
        return not self.stuck and self.engine.has_unfinished()

    def in_flight(self) -> int:
        return len(self.engine.scheduler.requests)

    def snapshot(self, now: float):
        """Its load at `now` (an idle replica's clock stays at its last step)."""
        return self.tracker.snapshot(self.engine.scheduler, now, now)


@dataclass
class ClusterRun(SimRun):
    routed: dict = field(default_factory=dict)  # why requests went where they went (routing_policy reasons, "shed")
    per_replica: list = field(default_factory=list)  # per replica: requests admitted, steps, busy seconds


class _Stats:
    """The loads the router sees: snapshots taken every period, visible `lag` later."""

    def __init__(self, replicas: list[_Replica], period: float, lag: float, start: float):
        self.replicas, self.period, self.lag = replicas, period, lag
        self.next_at = start
        self.pending: list[tuple[float, list]] = []  # (visible at, loads)
        self.visible: dict[int, object] = {i: None for i in range(len(replicas))}

    def advance(self, now: float) -> None:
        """Take the snapshots due by `now`. Nothing changed since the last event, so of the periods
        that passed meanwhile only two matter: the last one seen by now, and the last one taken."""
        if self.next_at <= now:
            last = self.next_at + math.floor((now - self.next_at) / self.period) * self.period
            seen = last - math.ceil(max(0.0, self.lag - (now - last)) / self.period) * self.period
            for at in sorted({max(seen, self.next_at), last}):
                self.pending.append((at + self.lag, [r.snapshot(at) for r in self.replicas]))
            self.next_at = last + self.period
        while self.pending and self.pending[0][0] <= now:
            self.visible = dict(enumerate(self.pending.pop(0)[1]))


def simulate_cluster(config: EngineConfig, requests: list[SimRequest], replicas: int, routing: str = "slo",
                     gpu: str = "a100-40gb", step_overhead: float = 1e-3, hardware: HardwareFit | None = None,
                     stats_period_s: float = 0.1, stats_lag_s: float = 0.05, stale_after_s: float = 3.0,
                     shed_unmeetable: bool = False, stop_when_decided: bool = False, check_every: int = 256,
                     max_sim_time: float | None = None, on_finish=None, seed: int = 0,
                     decision_scale: float | None = 1.0) -> ClusterRun:
    """Replay requests (sorted by arrival) over `replicas` copies of config's engine, routed by `routing`;
    decision_scale as aptray.sim.runner.build_engine's."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing {routing!r}: use one of {ROUTINGS}")
    reps = [_Replica(config, gpu, step_overhead, hardware, decision_scale) for _ in range(replicas)]
    rng = random.Random(seed)
    reqs = sorted(requests, key=lambda r: r.arrival_time)
    by_id = {r.request_id: r for r in reqs}
    arrivals = Arrivals(reqs)
    turns = Turns(arrivals)
    outcomes: dict[str, SimOutcome] = {}
    routed: Counter = Counter()
    sent = SentLog()
    start = arrivals.next_time if arrivals else 0.0
    stats = _Stats(reps, stats_period_s, stats_lag_s, start)
    for r in reps:
        r.clock.now = start

    def finished(rep: _Replica):
        def done(o: SimOutcome) -> None:
            rep.tracker.on_finish(by_id[o.request_id].prompt_len + len(o.token_times))
            turns.ended(o.request_id, rep.clock.now, len(o.token_times))
            if on_finish is not None:
                on_finish(o)
        return done
    done_of = [finished(r) for r in reps]

    def prefix_of(req: SimRequest) -> str | None:
        """The prefix a conversation's turn names: its conversation's (content_key)."""
        return prefix_tag(req.content_key) if req.content_key is not None else None

    def route(req: SimRequest, now: float) -> int:
        if routing == "slo":
            ranking = rank(RequestHint(req.prompt_len, req.ttft_slo or config.ttft_slo, prefix_of(req)),
                           stats.visible, sent, now, stale_after_s, rng)
            if ranking is not None:
                routed[ranking.reason] += 1
                sent.add(ranking.order[0], req.prompt_len, now)
                return ranking.order[0]
            routed[STALE] += 1
        else:
            routed["p2c"] += 1
        a, b = rng.sample(range(len(reps)), 2) if len(reps) > 1 else (0, 0)
        return a if reps[a].in_flight() <= reps[b].in_flight() else b

    def refused(req: SimRequest, now: float, error: str) -> None:
        outcomes[req.request_id].error = error
        turns.ended(req.request_id, now)

    steps, stopped, stalled = 0, False, False
    while True:
        busy = [r for r in reps if r.busy]
        t_step = min((r.clock.now for r in busy), default=math.inf)
        t_arr = arrivals.next_time if arrivals else math.inf
        if t_step == math.inf and t_arr == math.inf:
            break
        if max_sim_time is not None and min(t_step, t_arr) - start > max_sim_time:
            stopped = True
            break
        if (stop_when_decided and not arrivals and not arrivals.waiting_on_others and steps % check_every == 0
                and all(certain_miss(q, r.clock.now) for r in reps for q in r.engine.scheduler.requests.values())):
            stopped = True
            break
        if t_arr <= t_step:  # an arrival: route it and hand it to its replica
            now, req = next(arrivals.pop_due(t_arr))
            stats.advance(now)
            rep = reps[route(req, now)]
            if not rep.engine.has_unfinished() or rep.stuck:
                rep.clock.now = max(rep.clock.now, now)
                rep.stuck = False
            outcomes[req.request_id] = SimOutcome(req.request_id, now, "rejected")
            ttft_slo = req.ttft_slo or config.ttft_slo
            if shed_unmeetable and predict_ttft(rep.snapshot(now), req.prompt_len, now) > ttft_slo:
                routed[SHED] += 1
                refused(req, now, "shed: predicted TTFT over its SLO")
                continue
            try:
                admitted = rep.engine.add_request(req.request_id, turns.prompt(req), sampling_of(req), arrival_time=now)
            except ValueError as e:
                refused(req, now, str(e))
                continue
            rep.tracker.on_add(admitted, prefix_of(req))
            outcomes[req.request_id].status = "unfinished"
            rep.admitted += 1
            continue
        k = min(range(len(reps)), key=lambda j: reps[j].clock.now if reps[j].busy else math.inf)
        rep = reps[k]
        stats.advance(rep.clock.now)
        got = lean_step(rep.engine, rep.observed, rep.clock, outcomes, done_of[k])
        steps += 1
        if got is None:
            rep.stuck = True
            continue
        rep.tokenless = rep.tokenless + 1 if got == 0 else 0
        if rep.tokenless >= MAX_STEPS_WITHOUT_TOKEN:
            stopped = stalled = True
            break
    for rep in reps:  # unfinished: keep what they produced
        for q in rep.engine.scheduler.requests.values():
            o = outcomes[q.request_id]
            o.token_times, o.num_preemptions = list(q.token_times), q.num_preemptions
    end = max([r.clock.now for r in reps] + [start])
    for r in arrivals.never_sent():
        outcomes[r.request_id] = SimOutcome(r.request_id, end, "unfinished")
    sched: Counter = Counter()
    for rep in reps:
        sched.update({k: v for k, v in scheduler_stats(rep.engine.scheduler).items() if isinstance(v, int)})
    return ClusterRun([outcomes[r.request_id] for r in reqs if r.request_id in outcomes], end - start, stopped,
                      steps, sum(r.executor.busy_time for r in reps), dict(sched), reps[0].executor.num_blocks,
                      stalled, decision_time=sum(r.executor.decision_time for r in reps), routed=dict(routed),
                      per_replica=[{"admitted": r.admitted, "steps": r.executor.steps, "busy_s": r.executor.busy_time} for r in reps])
