"""Prometheus metrics of one serving replica: latencies, queue, cache, scheduler and SLOs.

Each ServingMetrics owns its registry (no global state: several engines can live in one
process, e.g. in tests); the ingress serves registry text on /metrics.
"""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from aptray.request import CacheKind
from aptray.slo import attained

PREFIX_STATS = ("queried_tokens", "hit_tokens", "queried_blocks", "hit_blocks")  # scheduler.stats["prefix_" + key]
# latency buckets from 5 ms (GPU TBT) to 2 min (CPU TTFT under load)
_LATENCY = (.005, .01, .025, .05, .075, .1, .15, .25, .4, .6, 1, 1.5, 2.5, 5, 10, 20, 40, 80, 120)
_STORE = (5e-4, 1e-3, 2.5e-3, 5e-3, .01, .025, .05, .1, .25, .5, 1, 2, 5)
_SCHED = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, .1)
RECENT_S = 600.0  # how far back recent_attainment can look


class RefusalCounts:
    """Requests an ingress replica answered with an error, by API and status (what the client got:
    a 401, 413 or 422 at the HTTP edge, a 429 of a key's cap, a gRPC status as its HTTP code).
    Kept apart from ServingMetrics, which lives in the router: most refusals never reach it."""

    def __init__(self):
        self.counts: dict[tuple[str, int], int] = {}

    def add(self, api: str, status: int) -> None:
        self.counts[api, status] = self.counts.get((api, status), 0) + 1

    def prometheus_text(self) -> bytes:
        lines = ["# HELP aptray_refused_requests_total requests this replica answered with an error",
                 "# TYPE aptray_refused_requests_total counter"]
        lines += [f'aptray_refused_requests_total{{api="{api}",status="{status}"}} {n}'
                  for (api, status), n in sorted(self.counts.items())]
        return ("\n".join(lines) + "\n").encode()


class CountRefusals:
    """ASGI middleware (the outermost): every HTTP response of 400 or over goes into counts."""

    def __init__(self, app, counts: RefusalCounts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.counts.add("http", message["status"])
            await send(message)
        await self.app(scope, receive, counting_send)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.ttft = Histogram("aptray_ttft_seconds", "time to first token", buckets=_LATENCY, registry=r)
        self.tbt = Histogram("aptray_tbt_seconds", "time between tokens", buckets=_LATENCY, registry=r)
        self.e2e = Histogram("aptray_e2e_seconds", "arrival to last token", buckets=_LATENCY, registry=r)
        self.waiting = Gauge("aptray_requests_waiting", "requests waiting (new or preempted)", registry=r)
        self.running = Gauge("aptray_requests_running", "requests holding cache", registry=r)
        self.blocks = Gauge("aptray_cache_blocks_in_use", "physical cache blocks held", ["kind"], registry=r)
        self.blocks_total = Gauge("aptray_cache_blocks_total", "physical cache blocks in the pool", registry=r)
        self.blocks_cached = Gauge("aptray_cache_blocks_cached", "cache blocks no request holds, kept for prefix "
                                   "hits until allocation needs them", registry=r)
        # admissions' prefix lookups: tokens (and full blocks, in the admitted kind) asked and found cached
        self.prefix = {key: Counter(f"aptray_prefix_cache_{key}", f"prefix cache: {key.replace('_', ' ')} at admission",
                                    registry=r) for key in PREFIX_STATS}
        self.preemptions = Counter("aptray_preemptions", "requests preempted by recompute", registry=r)
        self.conversions = Counter("aptray_conversions", "cache conversions", ["to_kind"], registry=r)
        self.alpha = Gauge("aptray_alpha_seconds_per_block", "apt scheduler: iteration seconds per hidden block",
                           registry=r)
        self.sched_time = Histogram("aptray_scheduler_seconds", "scheduler time per iteration", buckets=_SCHED,
                                    registry=r)
        self.step_time = Histogram("aptray_step_seconds", "shard time per iteration", buckets=_LATENCY, registry=r)
        self.slo_attained = Counter("aptray_slo_attained", "finished requests that met TTFT and TBT", registry=r)
        self.slo_missed = Counter("aptray_slo_missed", "requests that missed their SLO", ["reason"], registry=r)
        self.rejected = Counter("aptray_requests_rejected", "requests refused at admission", ["reason"],
                                registry=r)
        self.shard_rebuilds = Counter("aptray_shard_rebuilds", "shard groups rebuilt after a shard died",
                                      registry=r)
        self.resumed = Counter("aptray_requests_resumed", "requests resumed after a fault", ["source"], registry=r)
        self.store_up = Gauge("aptray_store_available", "1 while Redis takes writes", registry=r)
        self.store_outages = Counter("aptray_store_outages", "times Redis went away", registry=r)
        # a slow Redis delays every admission (accepted only once written) before it times out (store.py)
        self.store_write = Histogram("aptray_store_write_seconds", "Redis round trip of each write (a batch of "
                                     "records), failed ones included", buckets=_STORE, registry=r)
        # a structured request's wait for its grammar at admission (about 0 where the router kept it)
        self.grammar_wait = Histogram("aptray_grammar_wait_seconds", "a structured request's wait for its "
                                      "compiled grammar at admission, refusals included", buckets=_LATENCY, registry=r)
        self._seen_stats: dict[str, int] = {}
        self._recent: deque[tuple[float, bool]] = deque()  # (monotonic time, attained) of ended requests
        self._seen_faults: dict[str, int] = {"outages": 0}
        for kind in CacheKind:  # export zeros from the start, not only after the first step
            self.blocks.labels(kind.value).set(0)

    # -- per iteration --------------------------------------------------------------------------
    def observe_iteration(self, scheduler, schedule_s: float | None, step_s: float | None) -> None:
        """Queue, cache and counters from the scheduler after one engine step."""
        self.waiting.set(len(scheduler.waiting))
        self.running.set(len(scheduler.running))
        blocks = scheduler.blocks
        for kind in CacheKind:
            self.blocks.labels(kind.value).set(blocks.held_by(kind))
        self.blocks_total.set(blocks.num_blocks)
        self.blocks_cached.set(blocks.num_evictable)
        # scheduler.stats is a cumulative Counter: export only what grew since the last look
        for key, value in scheduler.stats.items():
            delta = value - self._seen_stats.get(key, 0)
            if delta > 0:
                if key == "preemptions":
                    self.preemptions.inc(delta)
                elif key.startswith("conversions_to_"):
                    self.conversions.labels(key.removeprefix("conversions_to_")).inc(delta)
                elif key.removeprefix("prefix_") in self.prefix:
                    self.prefix[key.removeprefix("prefix_")].inc(delta)
            self._seen_stats[key] = value
        alpha = getattr(scheduler, "alpha", None)
        if alpha is not None:
            self.alpha.set(alpha)
        if schedule_s is not None:
            self.sched_time.observe(schedule_s)
        if step_s is not None:
            self.step_time.observe(step_s)

    def forget_scheduler(self) -> None:
        """A new scheduler (shard group rebuilt) counts from zero again."""
        self._seen_stats = {}

    def observe_faults(self, faults: dict, store_ok: bool, outages: int) -> None:
        """Router fault counters (cumulative) since the last look."""
        for key, value in list(faults.items()) + [("outages", outages)]:
            delta = value - self._seen_faults.get(key, 0)
            self._seen_faults[key] = value
            if delta <= 0:
                continue
            if key == "shard_rebuilds":
                self.shard_rebuilds.inc(delta)
            elif key == "outages":
                self.store_outages.inc(delta)
            elif key.startswith("resumed_"):
                self.resumed.labels(key.removeprefix("resumed_")).inc(delta)
        self.store_up.set(1 if store_ok else 0)

    # -- per request ----------------------------------------------------------------------------
    def observe_finished(self, arrival: float, token_times: list[float], ttft_slo: float, tbt_slo: float,
                         finish_reason: str) -> bool:
        """Latencies of one finished request; returns whether it attained its SLO."""
        ttft = token_times[0] - arrival if token_times else None
        gaps = [b - a for a, b in zip(token_times, token_times[1:])]
        if ttft is not None:
            self.ttft.observe(ttft)
            self.e2e.observe(token_times[-1] - arrival)
        for g in gaps:
            self.tbt.observe(g)
        if finish_reason not in ("stop", "length"):
            self.slo_missed.labels(finish_reason).inc()
            if finish_reason != "abort":  # a client that went away says nothing of the load
                self._ended(False)
            return False
        if attained(ttft, gaps, ttft_slo, tbt_slo):
            self.slo_attained.inc()
            self._ended(True)
            return True
        self.slo_missed.labels("ttft" if ttft is None or ttft > ttft_slo else "tbt").inc()
        self._ended(False)
        return False

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
        self.slo_missed.labels("rejected").inc()
        self._ended(False)

    def _ended(self, ok: bool) -> None:
        now = time.monotonic()
        self._recent.append((now, ok))
        try:  # the engine's thread and the event loop both end requests: either may trim
            while self._recent[0][0] < now - RECENT_S:
                self._recent.popleft()
        except IndexError:
            pass

    def recent_attainment(self, window_s: float) -> tuple[int, int]:
        """(attained, ended) over the requests that ended (finished, failed or refused; not aborted
        by their client) in the last window_s."""
        since = time.monotonic() - window_s
        ended = [ok for t, ok in list(self._recent) if t >= since]
        return sum(ended), len(ended)

    def text(self) -> bytes:
        return generate_latest(self.registry)
