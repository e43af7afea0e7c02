"""Which replica a request goes to: the SLO-aware ranking (torch-free, Ray-free).

The request router (slo_router.py) and the simulator's multi-replica mode (aptray/sim/cluster.py)
both rank replicas here, from the loads the replicas reported (ttft_estimate.ReplicaLoad) and what
the caller itself sent each of them since:

1. replicas whose stats are fresh and whose predicted TTFT meets the request's SLO, most headroom
   (SLO - predicted TTFT) first (each replica's relayed streams priced at one shared figure,
   shared_stream_s); a replica holding the request's prompt prefix goes first among
   them when it meets the SLO too (that costs no SLO). Optionally (equal_fraction > 0), replicas
   whose predictions are within that fraction of the SLO of the best one count as equal (where the
   served TTFT's jitter is larger than what the prediction tells apart): among those, the one with
   fewest requests in flight goes first, as with Serve's default, since every request there shares
   its steps (fewer: shorter gaps between the tokens of all);
2. replicas without fresh stats (just started, or their stats stopped coming), in random order;
3. fresh replicas that cannot meet it, least late first; then those that take no requests now.

A request that no replica can meet (Apt-Serve's rule, one level up: spend the scarce resource
where it saves an SLO) goes first to the replica furthest behind: it would miss anywhere, and
there it delays no request that could still meet its SLO, so the replicas with headroom keep it
for those. With shed_unmeetable that replica refuses it (429); without, it is served late.

With no fresh stats at all the caller routes by Serve's default (power of two choices) instead.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from aptray.serve.ttft_estimate import ReplicaLoad, predict_ttft

# reasons a request went where it went (the aptray_routed_requests_total label)
SLO, PREFIX, UNMEETABLE, STALE, NO_INFO = "slo", "prefix", "slo_unmeetable", "stale", "no_info"
SEND_LAG_S = 0.05  # a request sent this long before a snapshot may not be in it yet: count it


@dataclass(frozen=True)
class RequestHint:
    """What the router knows of a request before it picks a replica."""
    prompt_tokens: int
    ttft_slo: float  # seconds
    prefix: str | None = None  # the tag of the prompt prefix it names (prefix_key.py)


@dataclass
class Ranking:
    order: list  # replica ids, preferred first
    reason: str
    predicted: dict  # replica id -> predicted TTFT (fresh replicas only)


class SentLog:
    """Requests (and their prompt tokens) this router sent each replica lately: what the replica's
    last snapshot cannot know yet. Bursts arrive faster than stats refresh; without this every
    request of a burst would see the same snapshot and go to the same replica."""

    def __init__(self, keep_s: float = 30.0):
        self.keep_s = keep_s
        self._sent: dict = {}  # replica id -> deque of (time, tokens)

    def add(self, replica_id, tokens: int, now: float) -> None:
        self._sent.setdefault(replica_id, deque()).append((now, tokens))

    def remove(self, replica_id, tokens: int) -> None:
        """Undo the latest add of `tokens` to replica_id (the request went elsewhere)."""
        log = self._sent.get(replica_id)
        if log:
            for i in range(len(log) - 1, -1, -1):
                if log[i][1] == tokens:
                    del log[i]
                    return

    def since(self, replica_id, taken_at: float, now: float) -> tuple[int, int]:
        """(prompt tokens, requests) sent to replica_id that a snapshot taken at taken_at may lack."""
        log = self._sent.get(replica_id)
        if not log:
            return 0, 0
        while log and log[0][0] < now - self.keep_s:
            log.popleft()
        recent = [tokens for t, tokens in log if t >= taken_at - SEND_LAG_S]
        return sum(recent), len(recent)

    def forget_others(self, live_ids) -> None:
        for rid in set(self._sent) - set(live_ids):
            del self._sent[rid]


def rank(hint: RequestHint, loads: dict, sent: SentLog, now: float, stale_after_s: float,
         rng: random.Random | None = None, in_flight: dict | None = None,
         equal_fraction: float = 0.0) -> Ranking | None:
    """loads: replica id -> its last ReplicaLoad (None if it reported none). equal_fraction: predicted
    TTFTs closer than this fraction of the request's SLO count as equal, the fewest in_flight first
    among them (replica id -> requests the caller has there now, exact unlike a snapshot; a replica
    missing from it counts what its snapshot says); 0: most headroom first, always. None when no
    replica's stats are fresh (the caller then routes by Serve's default)."""
    rng = rng or random
    fresh = {rid: load for rid, load in loads.items()
             if load is not None and now - load.taken_at <= stale_after_s}
    if not fresh:
        return None
    unknown = [rid for rid in loads if rid not in fresh]
    rng.shuffle(unknown)
    ids = list(fresh)
    rng.shuffle(ids)  # equal predictions: no replica is everyone's first choice
    per_stream = shared_stream_s(fresh.values())
    predicted = {rid: predict_ttft(fresh[rid], hint.prompt_tokens, now, *sent.since(rid, fresh[rid].taken_at, now),
                                   stream_s=per_stream)
                 for rid in ids}
    meets = sorted((rid for rid in ids if predicted[rid] <= hint.ttft_slo), key=predicted.__getitem__)
    late = sorted((rid for rid in ids if hint.ttft_slo < predicted[rid] < math.inf), key=predicted.__getitem__)
    down = [rid for rid in ids if predicted[rid] == math.inf]
    if not meets:  # lost anywhere: where it takes nothing from requests that can still be saved
        return Ranking(late[::-1] + unknown + down, UNMEETABLE, predicted)
    if equal_fraction > 0:
        meets = _fewest_in_flight_among_equal(meets, predicted, equal_fraction * hint.ttft_slo, fresh,
                                              in_flight or {})
    reason = SLO
    if hint.prefix is not None:
        holders = [rid for rid in meets if hint.prefix in fresh[rid].prefixes]
        if holders:
            meets.remove(holders[0])
            meets.insert(0, holders[0])
            reason = PREFIX
    return Ranking(meets + unknown + late + down, reason, predicted)


def shared_stream_s(loads) -> float:
    """What the serving path adds per relayed stream, one figure for all the replicas ranked: the
    mean of what they report (ttft_estimate.ServingDelay). They run the same serving path on the
    same resources, so where their fits differ, that is noise and staleness: a replica the router
    avoids serves nothing and learns nothing, so its figure stays where a burst left it, and the
    router keeps avoiding it. Measured on this machine, 3 replicas reported 0.010, 0.057 and 0.058
    s per stream at once and the one reporting least got 17 to 24 of a 30-request chunk
    (docs/SERVING.md, "Routing and autoscaling across replicas"). Each replica's own streams still
    count: a shared figure times its streams."""
    values = [load.stream_s for load in loads if load.ok]
    return sum(values) / len(values) if values else 0.0


def _fewest_in_flight_among_equal(meets: list, predicted: dict, within_s: float, fresh: dict,
                                  in_flight: dict) -> list:
    """meets (best predicted TTFT first) with the replicas as good as the best, within within_s,
    ordered by requests in flight (stable: ties keep their order)."""
    limit = predicted[meets[0]] + within_s
    equal = [rid for rid in meets if predicted[rid] <= limit]
    if len(equal) < 2:
        return meets

    def requests_there(rid) -> int:
        n = in_flight.get(rid)
        return n if n is not None else fresh[rid].queued + fresh[rid].decoding
    return sorted(equal, key=requests_there) + meets[len(equal):]


class ParsedLoads:
    """Replica id -> ReplicaLoad (or None) from the routing stats dicts Serve hands the router,
    each parsed once per snapshot. Serve hands the same dict until the replica reports again, and
    the router ranks every request: parsing costs ~50 us per replica, ~230 us with 256 prefix
    tags (measured here), which each request of a burst would wait for in the proxy."""

    def __init__(self):
        self._parsed: dict = {}  # replica id -> (the stats dict, its taken_at, its ReplicaLoad or None)

    def of(self, stats_by_replica: dict) -> dict:
        out = {}
        for rid, stats in stats_by_replica.items():
            taken_at = stats.get("taken_at") if isinstance(stats, dict) else None
            seen = self._parsed.get(rid)
            if seen is None or seen[0] is not stats or seen[1] != taken_at:  # taken_at: a dict changed in place
                seen = self._parsed[rid] = (stats, taken_at, ReplicaLoad.from_stats(stats))
            out[rid] = seen[2]
        return out

    def forget_others(self, live_ids) -> None:
        for rid in set(self._parsed) - set(live_ids):
            del self._parsed[rid]
