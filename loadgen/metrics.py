"""Per-request records and the SLO metrics of a run (aptray.slo defines attainment).

A request attains its SLO iff it finished, TTFT <= its TTFT SLO, and the P99 of its own
inter-token gaps (first token excluded) <= its TBT SLO. Rejected, failed, aborted or unfinished
requests are misses. Attainment = attained / all requests sent.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from aptray.slo import attained, tbt_p99

FINISHED = "finished"
MISS_STATUSES = ("rejected", "failed", "aborted", "unfinished")


@dataclass
class RequestRecord:
    request_id: str
    arrived_at: float  # seconds, on the run's clock
    prompt_len: int
    output_len: int  # tokens asked for
    ttft_slo: float
    tbt_slo: float
    status: str = FINISHED
    ttft: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # between consecutive tokens, first excluded
    e2e: float | None = None  # arrival to last token
    num_tokens: int = 0  # tokens received
    num_preemptions: int = 0

    @classmethod
    def from_token_times(cls, request_id: str, arrived_at: float, prompt_len: int, output_len: int,
                         ttft_slo: float, tbt_slo: float, token_times: list[float], status: str = FINISHED,
                         num_preemptions: int = 0) -> "RequestRecord":
        times = list(token_times)
        return cls(request_id, arrived_at, prompt_len, output_len, ttft_slo, tbt_slo, status,
                   ttft=times[0] - arrived_at if times else None,
                   token_gaps=[b - a for a, b in zip(times, times[1:])],
                   e2e=times[-1] - arrived_at if times else None, num_tokens=len(times),
                   num_preemptions=num_preemptions)

    @property
    def tbt_p99(self) -> float:
        return tbt_p99(self.token_gaps)

    @property
    def attained(self) -> bool:
        return self.status == FINISHED and attained(self.ttft, self.token_gaps, self.ttft_slo, self.tbt_slo)

    @property
    def finished_at(self) -> float | None:
        return None if self.e2e is None else self.arrived_at + self.e2e

    def to_dict(self) -> dict:
        return asdict(self)


def attainment(records: list[RequestRecord]) -> float:
    return sum(r.attained for r in records) / len(records) if records else 0.0


def run_duration(records: list[RequestRecord]) -> float:
    """First arrival to last token (or last arrival, if later)."""
    if not records:
        return 0.0
    ends = [r.finished_at for r in records if r.finished_at is not None] + [r.arrived_at for r in records]
    return max(ends) - min(r.arrived_at for r in records)


def goodput(records: list[RequestRecord], duration: float | None = None) -> float:
    """vLLM-style goodput: requests that met their SLOs per second of the run."""
    duration = run_duration(records) if duration is None else duration
    return sum(r.attained for r in records) / duration if duration > 0 else 0.0


def percentiles(values, ps=(50, 90, 99)) -> dict[str, float]:
    values = np.asarray(list(values), dtype=float)
    if values.size == 0:
        return {f"p{p}": float("nan") for p in ps}
    return {f"p{p}": float(np.percentile(values, p)) for p in ps}


def prefix_cache(stats: dict | None) -> dict | None:
    """Prefix-cache hit rates of a run from its scheduler counters (prefix_*: tokens and full blocks
    looked up at admission and found cached); None when the run had no prefix cache."""
    stats = stats or {}
    if "prefix_queried_tokens" not in stats:
        return None
    out = {k.removeprefix("prefix_"): stats.get(k, 0) for k in
           ("prefix_queried_tokens", "prefix_hit_tokens", "prefix_queried_blocks", "prefix_hit_blocks")}
    out["hit_rate_tokens"] = out["hit_tokens"] / out["queried_tokens"] if out["queried_tokens"] else 0.0
    out["hit_rate_blocks"] = out["hit_blocks"] / out["queried_blocks"] if out["queried_blocks"] else 0.0
    return out


def summarize(records: list[RequestRecord], duration: float | None = None, stats: dict | None = None) -> dict:
    """The run's SLO and latency figures; with stats (the scheduler's counters), its prefix-cache hit
    rates too, where it had a prefix cache."""
    duration = run_duration(records) if duration is None else duration
    done = [r for r in records if r.status == FINISHED]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    hits = prefix_cache(stats)
    return {
        "num_requests": len(records),
        "statuses": statuses,
        "attainment": attainment(records),
        "goodput_rps": goodput(records, duration),
        "throughput_rps": len(done) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": sum(r.num_tokens for r in records) / duration if duration > 0 else 0.0,
        "duration_s": duration,
        "ttft_s": percentiles(r.ttft for r in records if r.ttft is not None),
        "tbt_s": percentiles(g for r in records for g in r.token_gaps),
        "tbt_p99_per_request_s": percentiles(r.tbt_p99 for r in done),
        "e2e_s": percentiles(r.e2e for r in done),
        "preemptions": sum(r.num_preemptions for r in records),
        **({"prefix_cache": hits} if hits is not None else {}),
    }
