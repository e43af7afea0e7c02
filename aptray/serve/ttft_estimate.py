"""What a new request would wait for its first token on one replica (torch-free, Ray-free).

A replica describes its load in a ReplicaLoad: the prompt tokens not yet computed of every
request ahead of a new one, how many requests decode, its free and held cache blocks, and a fit
of its own step times (step = c0 + c_pf x prefill tokens + c_dec x decodes, on recent steps).
`predict_ttft` turns that into seconds for a request of a given prompt length; the request router
ranks replicas by it (slo_router.py), the replica's admission sheds with it (router.py), and the
simulator's multi-replica mode uses the same code (aptray/sim/cluster.py).

LoadTracker keeps what the snapshot needs from the engine's history (step speed, blocks freed per
second, tokens per step, the named prefixes admitted: prefix_holders.py) and reads the engine's
present through the scheduler's public state only: `waiting`, `running`, `blocks.num_free`,
`blocks.num_blocks`, `blocks.is_cached` and the requests' fields.

ServingDelay, in the ingress, learns what the serving path adds to a TTFT beyond the engine's wait.
A streamed request also waits for its replica's ingress and the relays between the ingress and the
engine's actor, whose event loops carry every token of every stream they relay. On a shared CPU
that part can be most of a TTFT, and it grows with the streams a replica relays: a prediction
without it ranks two replicas by a few milliseconds of steps and sends a whole burst of short
prompts to one of them (docs/SERVING.md, "Routing and autoscaling across replicas").
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from aptray.serve.prefix_holders import PrefixHolders

# A request's TTFT is never predicted beyond this (a replica with hours of work queued): large
# enough to lose every comparison, finite so that sums stay numbers.
UNBOUNDED_WAIT_S = 3600.0
FREED_WINDOW_S = 10.0  # blocks freed per second of steps: over the finishes of this many busy seconds
BUDGET_STEPS = 200  # tokens per step: the most seen in this many recent steps
RELEASE_POINTS = 8  # a snapshot's curve of blocks the running requests give back: this many points


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica's load at `taken_at` (its clock: time.time() when served, virtual in the simulator)."""
    taken_at: float
    ok: bool = True  # False: it takes no requests now (router restarting, draining, broken)
    queued_tokens: int = 0  # uncomputed tokens of the waiting and still-prefilling requests
    queued: int = 0
    decoding: int = 0
    free_blocks: int = 0
    num_blocks: int = 0
    held_blocks: dict = field(default_factory=dict)  # cache kind -> blocks held by running requests
    block_tokens: dict = field(default_factory=dict)  # cache kind -> tokens one block holds
    step_cost: tuple = (0.0, 0.0, 0.0)  # (c0 s, c_pf s per prefill token, c_dec s per decode)
    token_budget: int = 2048  # tokens one step computes at most (as recently seen)
    mixed: bool = True  # decodes share steps with prefills (sarathi, apt mixed); fcfs prefills alone
    freed_blocks_per_s: float = 0.0  # blocks finishing requests gave back per second of steps, recently
    # ((seconds, blocks), ...): blocks the running requests give back within `seconds` at the latest
    # (each after its max_tokens, at the current step time; a request that stops early frees sooner)
    release: tuple = ()
    prefixes: tuple = ()  # tags of the named prompt prefixes it holds cached, newest first (prefix_holders.py)
    # what the serving path (ingress, relays) adds to a TTFT beyond the engine's wait, per stream its
    # ingress relays with the new one (ServingDelay, below); 0 where nothing measures it (the simulator)
    stream_s: float = 0.0
    streams: int = 0  # requests its ingress relays now

    def to_stats(self) -> dict:
        """JSON-able: what record_routing_stats returns."""
        d = asdict(self)
        d["step_cost"] = list(self.step_cost)
        d["release"] = [list(p) for p in self.release]
        d["prefixes"] = list(self.prefixes)
        return d

    @classmethod
    def from_stats(cls, stats) -> "ReplicaLoad | None":
        """The load a replica reported, or None for anything malformed (routed by default then)."""
        if not isinstance(stats, dict) or "taken_at" not in stats:
            return None
        try:
            load = cls(**{k: stats[k] for k in cls.__dataclass_fields__ if k in stats})
            cost = tuple(float(c) for c in load.step_cost)
            numbers = (load.taken_at, load.queued_tokens, load.queued, load.decoding, load.free_blocks,
                       load.num_blocks, load.token_budget, load.freed_blocks_per_s, load.stream_s, load.streams, *cost)
            if len(cost) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
                return None
            release = tuple((float(t), int(n)) for t, n in load.release)
            return cls(**{**asdict(load), "step_cost": cost, "release": release, "prefixes": tuple(load.prefixes),
                          "held_blocks": dict(load.held_blocks), "block_tokens": dict(load.block_tokens),
                          "stream_s": max(float(load.stream_s), 0.0), "streams": max(int(load.streams), 0)})
        except (TypeError, ValueError):
            return None

    def step_seconds(self) -> float:
        """A step of the current batch: the decodes and a step's fixed cost."""
        c0, _, c_dec = self.step_cost
        return c0 + c_dec * self.decoding

    def tokens_per_block(self) -> int:
        """The most tokens one free block takes (a hidden block holds twice a KV one)."""
        return max(self.block_tokens.values(), default=16) or 16

    def seconds_to_free(self, blocks: int) -> float:
        """How long until `blocks` more blocks are free: by the release curve (an upper bound) or,
        where shorter, at the rate finishing requests have lately freed them.

        Blocks past the curve are wanted by requests queued ahead, which give them back as they
        finish. With no finish seen lately (a replica that has just started) nothing tells how
        long they run: they count as back when the curve ends. That is optimistic, and a
        wait without end would be wrong: it would shed a cold replica's first burst larger
        than its pool, whatever the SLOs."""
        by_curve = next((t for t, n in self.release if n >= blocks), math.inf)
        if self.freed_blocks_per_s > 0:
            return min(by_curve, blocks / self.freed_blocks_per_s)
        if by_curve == math.inf:
            return self.release[-1][0] if self.release else 0.0
        return by_curve


def prefill_seconds(load: ReplicaLoad, tokens: int) -> float:
    """Seconds of steps to compute `tokens` prompt tokens after what is ahead of them, at the
    replica's fitted speed: each step computes at most the budget left by the decodes (mixed
    policies) and costs its fixed part, the decodes it carries and its prefill tokens."""
    if tokens <= 0:
        return 0.0
    c0, c_pf, c_dec = load.step_cost
    if load.mixed:
        room = max(load.token_budget - load.decoding, load.token_budget // 8, 1)
        per_step = c0 + c_dec * load.decoding
    else:
        room, per_step = max(load.token_budget, 1), c0
    return math.ceil(tokens / room) * per_step + tokens * c_pf


def predict_ttft(load: ReplicaLoad, prompt_tokens: int, now: float, sent_tokens: int = 0,
                 sent_requests: int = 0, stream_s: float | None = None) -> float:
    """Seconds from `now` to the first token of a new request of prompt_tokens on this replica.

    sent_tokens, sent_requests: prompt tokens and requests the caller sent there since the snapshot
    (not in it yet). What was queued at the snapshot has drained by the time elapsed since. The
    request waits for the step under way (half of one, on average), the queue ahead and its own
    prefill; if the free blocks cannot hold all of that, for finishing requests to free the rest;
    and for the serving path, by the streams it will relay with this one (at stream_s each: the
    replica's own, load.stream_s, unless given)."""
    if not load.ok:
        return math.inf
    age = max(0.0, now - load.taken_at)
    backlog = max(0.0, prefill_seconds(load, load.queued_tokens) - age)
    busy = load.decoding or load.queued_tokens or sent_tokens or sent_requests
    wait = ((load.step_seconds() / 2 if busy else 0.0) + backlog + prefill_seconds(load, sent_tokens + prompt_tokens)
            + (load.stream_s if stream_s is None else stream_s) * (load.streams + sent_requests + 1))
    need = math.ceil((load.queued_tokens + sent_tokens + prompt_tokens) / load.tokens_per_block())
    short = need - load.free_blocks
    if short > 0:
        wait += load.seconds_to_free(short)
    return min(wait, UNBOUNDED_WAIT_S)


class DecayedNonNegativeFit:
    """y = coef . x, least squares over past observations, each older one weighing `decay` times
    less. Coefficients stay >= 0 (a cost is never negative); before any observation, and while the
    observations cannot tell the coefficients apart, coef keeps its last value (at first, prior)."""

    def __init__(self, prior: tuple, decay: float, ridge: float = 1e-6):
        self.decay, self.ridge = decay, ridge
        n = len(prior)
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self.coef = tuple(max(float(c), 0.0) for c in prior)
        self.observations = 0

    def observe(self, x: tuple, y: float) -> None:
        n = len(self._xty)
        for i in range(n):
            self._xty[i] = self.decay * self._xty[i] + x[i] * y
            for j in range(n):
                self._xtx[i][j] = self.decay * self._xtx[i][j] + x[i] * x[j]
        self.observations += 1
        self.coef = self._solve()

    def _solve(self) -> tuple:
        """Non-negative least squares by dropping a negative coefficient and refitting the rest."""
        active = list(range(len(self._xty)))
        while active:
            sol = _solve_subset(self._xtx, self._xty, active, self.ridge)
            if sol is None:
                return self.coef
            negative = [i for i in active if sol[i] < 0]
            if not negative:
                return tuple(sol)
            active.remove(min(negative, key=lambda i: sol[i]))
        return self.coef


def _solve_subset(a, b, active: list[int], ridge: float) -> list[float] | None:
    """Solve the normal equations on the active coefficients (the others 0), by Gaussian elimination."""
    n = len(active)
    m = [[a[i][j] + (ridge * max(a[i][i], 1.0) if i == j else 0.0) for j in active] + [b[i]] for i in active]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    out = [0.0] * len(b)
    for k, i in enumerate(active):
        out[i] = m[k][n] / m[k][k]
    return out


class StepSpeed(DecayedNonNegativeFit):
    """Step time = c0 + c_pf x prefill tokens + c_dec x decodes, least squares over recent steps
    (each older step weighs `decay` times less). Coefficients stay >= 0; before any step, c0 is
    the prior (the engine's fastest step, if measured)."""

    def __init__(self, prior_c0: float = 0.0, decay: float = 0.99, ridge: float = 1e-6):
        super().__init__((prior_c0, 0.0, 0.0), decay, ridge)

    def observe(self, prefill_tokens: int, decodes: int, seconds: float) -> None:
        super().observe((1.0, float(prefill_tokens), float(decodes)), seconds)


class LoadTracker:
    """What a replica's load snapshot needs from its history, fed by the engine's thread (on_step,
    on_finish) and read from another (snapshot): plain numbers, no locks needed."""

    def __init__(self, config, prior_step_s: float = 0.0):
        """config: the replica's EngineConfig (scheduler, block sizes, max_num_batched_tokens)."""
        self.config = config
        self.speed = StepSpeed(prior_step_s)
        self._step_tokens: deque[int] = deque(maxlen=BUDGET_STEPS)
        self._freed: deque[tuple[float, int]] = deque()  # (busy seconds when, blocks)
        self._busy_s = 0.0  # seconds of steps so far: idle time frees nothing, so rates are per busy second
        self.mixed = config.scheduler != "fcfs" and not (config.scheduler == "apt"
                                                         and config.iteration_shape == "alternate")
        # apt serves requests already past their SLO last: a new request does not wait behind them
        self.skips_lost = config.scheduler == "apt"
        self.block_tokens = {"kv": config.block_size}
        if config.cache_mode != "kv" and config.hidden_block_size:
            self.block_tokens["hidden"] = config.hidden_block_size
        self.prefixes = PrefixHolders(self.block_tokens) if config.enable_prefix_caching else None

    def on_step(self, plan, seconds: float) -> None:
        """After a step ran `plan` (a BatchPlan) in `seconds`."""
        decodes = sum(1 for s in plan.seqs if s.is_decode)
        tokens = plan.num_tokens
        self.speed.observe(tokens - decodes, decodes, seconds)
        self._step_tokens.append(tokens)
        self._busy_s += seconds

    def on_add(self, req, prefix: str | None) -> None:
        """The engine admitted req (a Request), naming its prompt prefix by that tag (or none)."""
        if prefix is not None and self.prefixes is not None:
            self.prefixes.note(prefix, req)

    def on_finish(self, num_tokens: int) -> None:
        """A request holding num_tokens (prompt + output) finished."""
        self._freed.append((self._busy_s, math.ceil(num_tokens / self.block_tokens["kv"])))

    def freed_blocks_per_s(self) -> float:
        """Blocks freed per second of steps, over the last FREED_WINDOW_S of them (0 before any)."""
        busy = self._busy_s
        while self._freed and self._freed[0][0] < busy - FREED_WINDOW_S:
            self._freed.popleft()
        return sum(n for _, n in list(self._freed)) / min(FREED_WINDOW_S, busy) if busy > 0 else 0.0

    def token_budget(self) -> int:
        configured = self.config.max_num_batched_tokens
        if not self.mixed:
            return configured
        seen = max(self._step_tokens, default=configured)  # the TBT-sized budget of sarathi and apt
        return min(configured, max(seen, configured // 8))

    def snapshot(self, scheduler, taken_at: float, now: float, inbox_tokens: int = 0, inbox: int = 0,
                 ok: bool = True, with_prefixes: bool = True) -> ReplicaLoad:
        """The load of the replica whose scheduler this is. taken_at: the reported time (wall
        clock); now: the clock on_finish was given. inbox: requests accepted but not yet in the
        scheduler. list() of a deque or list copies it in one step under the GIL, so another
        thread may call this while the engine's thread runs. Under apt, requests past their SLO
        are not ahead of a new one (it serves them last). with_prefixes: look up the prefixes it
        holds (routing stats need them; a TTFT prediction does not)."""
        waiting, running = list(scheduler.waiting), list(scheduler.running)
        queued_tokens, queued, decoding = inbox_tokens, inbox, 0
        held: dict[str, int] = {}
        leaving: list[tuple[int, int]] = []  # (steps left at most, blocks) of each running request
        for r in waiting:
            if not (self.skips_lost and past_slo(r, now)):
                queued_tokens += max(0, r.num_tokens - r.num_computed_tokens)
                queued += 1
        for r in running:
            kind = getattr(r.cache_kind, "value", "kv")
            per_block = self.block_tokens.get(kind, self.block_tokens["kv"])
            blocks = math.ceil(r.num_computed_tokens / per_block)
            held[kind] = held.get(kind, 0) + blocks
            leaving.append((max(0, r.sampling.max_tokens - len(r.output_token_ids)), blocks))
            if not r.is_prefilling:
                decoding += 1
            elif not (self.skips_lost and past_slo(r, now)):
                queued_tokens += max(0, r.num_tokens - r.num_computed_tokens)
                queued += 1
        blocks = scheduler.blocks
        c0, _, c_dec = self.speed.coef
        prefixes = self.prefixes.held(blocks) if with_prefixes and self.prefixes is not None else ()
        return ReplicaLoad(taken_at, ok, queued_tokens, queued, decoding, blocks.num_free, blocks.num_blocks, held,
                           dict(self.block_tokens), self.speed.coef, self.token_budget(), self.mixed,
                           self.freed_blocks_per_s(), release_curve(leaving, c0 + c_dec * decoding), prefixes)


def past_slo(r, now: float) -> bool:
    """Whether r is past its SLO now: TTFT before its first token, TBT since its last after (apt's
    violators, aptray.scheduler.apt.features)."""
    if r.first_token_time is None:
        return now - r.arrival_time > r.ttft_slo
    return now - r.last_token_time > r.tbt_slo


def release_curve(leaving: list[tuple[int, int]], step_s: float) -> tuple:
    """At most RELEASE_POINTS (seconds, blocks) points of the cumulative blocks that requests
    leaving after (steps, blocks) give back, at step_s per step."""
    leaving.sort()
    points, total = [], 0
    for steps, blocks in leaving:
        total += blocks
        points.append((steps * step_s, total))
    if len(points) <= RELEASE_POINTS:
        return tuple(points)
    picks = {round(k * (len(points) - 1) / (RELEASE_POINTS - 1)) for k in range(RELEASE_POINTS)}
    return tuple(points[k] for k in sorted(picks))


SERVING_DECAY = 0.98  # per request: the last ~50 requests count most


@dataclass(frozen=True)
class TtftProbe:
    """One request's measurement, begun when its admission starts."""
    started: float  # time.monotonic()
    engine_s: float  # the engine's predicted TTFT for it then
    streams: int  # requests the ingress relayed then, it included


class ServingDelay:
    """The ingress times each request from the start of its admission to its first chunk, takes
    away what the engine's last load predicted for it then, and fits the rest as stream_s x streams
    (the requests it relayed when the request came, the request included), recent requests weighing
    most. It reports stream_s and its streams with its load; predict_ttft adds stream_s x (streams +
    requests the router sent since + 1). No constant term: the delay grows with the streams. The
    request router prices every replica's streams at the mean of their stream_s
    (routing_policy.shared_stream_s): a replica's fit learns only from the requests it gets, so a
    figure a burst left high would keep the router away from it, and it from learning again."""

    def __init__(self):
        self.fit = DecayedNonNegativeFit((0.0,), SERVING_DECAY)
        self.engine_load: ReplicaLoad | None = None  # the engine's last load, as the routing stats carried it

    def begin(self, prompt_tokens: int, streams: int) -> TtftProbe | None:
        """A request of prompt_tokens starts admission while the ingress relays `streams` others;
        None before the engine has reported a load (nothing to subtract yet)."""
        load = self.engine_load
        if load is None or not load.ok:
            return None
        return TtftProbe(time.monotonic(), predict_ttft(load, prompt_tokens, time.time()), streams + 1)

    def first_chunk(self, probe: TtftProbe, reattached: bool = False) -> None:
        """The request's first chunk reached the ingress. reattached: its router died before the
        chunk came and it was admitted again by a new one; it waited for the restart, which is
        not the serving path's (docs/RELIABILITY.md), so it is not measured."""
        if reattached:
            return
        self.fit.observe((float(probe.streams),), time.monotonic() - probe.started - probe.engine_s)

    @property
    def stream_s(self) -> float:
        """Seconds each stream relayed (a new one included) adds to a new request's TTFT."""
        return self.fit.coef[0]
