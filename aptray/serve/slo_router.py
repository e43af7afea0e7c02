"""SloRouter: Serve's request router for aptray's replicas (RequestRouterConfig.request_router_class).

Each ingress replica reports its load through Serve's routing-stats hook (Ingress.record_routing_stats,
pulled by the controller every request_routing_stats_period_s and handed to every router). For
each request this router reads its TTFT SLO and prompt length (route_hints.py), predicts the TTFT
it would see on each replica (ttft_estimate.py, counting what this router sent there since the
replica's snapshot) and ranks the replicas by SLO headroom (routing_policy.py). Serve then sends
the request to the first of them that accepts it.

Requests without a hint (GETs, handle calls), and every request while no replica's stats are
fresh (stale_after_s), go by Serve's default: two random replicas, the shorter queue of the two.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter, OrderedDict

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

from aptray.serve import routing_counts
from aptray.serve.route_hints import hint_of
from aptray.serve.routing_policy import NO_INFO, STALE, ParsedLoads, SentLog, rank

logger = logging.getLogger("aptray")
MAX_TRACKED = 10_000  # requests remembered between choosing and sending (retries, cancellations)


class SloRouter(LocalityMixin, RequestRouter):
    def initialize_state(self, default_ttft_slo_ms: float = 1000.0, stale_after_s: float = 2.0,
                         equal_ttft_fraction: float = 0.0, **_):
        self.default_ttft_s = float(default_ttft_slo_ms) / 1000
        self.stale_after_s = float(stale_after_s)
        self.equal_fraction = float(equal_ttft_fraction)
        self.sent = SentLog()
        self.loads = ParsedLoads()
        self.counts: Counter = Counter()
        self._choices: OrderedDict = OrderedDict()  # internal request id -> (replica id, tokens)
        self._rng = random.Random()
        self._router_id = uuid.uuid4().hex[:12]
        self._flusher: asyncio.Task | None = None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._ensure_flusher()
        hint = hint_of(pending_request, self.default_ttft_s) if pending_request is not None else None
        if hint is None:
            return self._by_default(pending_request, NO_INFO)
        now = time.time()
        ranking = rank(hint, self.loads.of({r.replica_id: r.routing_stats for r in candidate_replicas}), self.sent, now,
                       self.stale_after_s, self._rng, self._in_flight(candidate_replicas) if self.equal_fraction else None,
                       self.equal_fraction)
        if ranking is None:
            return self._by_default(pending_request, STALE)
        # all replicas are ranked: when every one refuses (full), back off before the next round
        pending_request.routing_context.should_backoff = True
        self._note(pending_request, ranking.order[0], hint.prompt_tokens, ranking.reason, now)
        by_id = {r.replica_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in ranking.order]

    def _in_flight(self, replicas) -> dict:
        """Replica id -> requests this router has there now: Serve's queue-length cache (+1 when a
        request is sent, -1 when it ends, corrected by the replica's replies), what its default
        router balances. Empty where Serve keeps no cache (the snapshots' counts are used)."""
        cache = self.replica_queue_len_cache
        counts = {r.replica_id: cache.get(r.replica_id) for r in replicas}
        return {rid: n for rid, n in counts.items() if n is not None}

    def _by_default(self, pending_request, reason: str) -> list[list[RunningReplica]]:
        """Serve's default: two random replicas (local ones first, as its router does); the base
        class sends to the one with the shorter queue."""
        if pending_request is not None:
            self._note(pending_request, None, 0, reason, time.time())
        ids = list(self.apply_locality_routing(pending_request))
        if not ids:
            return []
        chosen = self._rng.sample(ids, min(2, len(ids)))
        return [[self._replicas[rid] for rid in chosen if rid in self._replicas]]

    def _note(self, pending_request, replica_id, tokens: int, reason: str, now: float) -> None:
        """Count the request once (choose_replicas runs again on a retry) and book its tokens on the
        replica it is expected to go to (on_request_routed corrects that if it went elsewhere)."""
        key = pending_request.metadata.internal_request_id
        if key in self._choices:
            old_replica, old_tokens = self._choices[key]
            if old_replica is not None:
                self.sent.remove(old_replica, old_tokens)
        else:
            self.counts[reason] += 1
        self._choices[key] = (replica_id, tokens)
        if replica_id is not None:
            self.sent.add(replica_id, tokens, now)
        while len(self._choices) > MAX_TRACKED:
            self._choices.popitem(last=False)

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        choice = self._choices.pop(pending_request.metadata.internal_request_id, None)
        if choice is None or choice[0] is None or choice[0] == replica_id:
            return
        self.sent.remove(choice[0], choice[1])  # the first choice refused it: book it where it went
        self.sent.add(replica_id, choice[1], time.time())

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        self.sent.forget_others(self._replicas)
        self.loads.forget_others(self._replicas)

    # -- counts for /metrics (routing_counts.py) ------------------------------------------------
    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_counts())

    async def _flush_counts(self) -> None:
        published = None
        while True:
            await asyncio.sleep(routing_counts.FLUSH_S)
            counts = dict(self.counts)
            if counts == published:
                continue
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, routing_counts.publish, self.app_name, self._router_id, counts)
                published = counts
            except Exception:  # the GCS away for a moment: the next round publishes the totals
                logger.warning("could not publish routing counts", exc_info=True)
