"""Per-request records and the SLO metrics of a run (aptray.slo defines attainment).

A request attains its SLO iff it finished, TTFT <= its TTFT SLO, and the P99 of its own
inter-token gaps (first token excluded) <= its TBT SLO. Rejected, failed, aborted or unfinished
requests, and finished ones that returned no token, are misses. Attainment = attained / all
requests sent.

Goodput as vLLM's `bench serve --goodput` reports it: SLOs by name and milliseconds (`ttft:250
tbt:100`; vLLM's names ttft, tpot, e2el, and aptray's tbt, the P99 of a request's own gaps), the
requests meeting all of them per second, and the share meeting each one (over every request sent,
misses included).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from aptray.slo import attained, tbt_p99

FINISHED = "finished"
MISS_STATUSES = ("rejected", "failed", "aborted", "unfinished")
GOODPUT_KINDS = ("ttft", "tbt", "tpot", "e2el")


ERROR_CHARS = 200  # of a refused or failed request's message, kept in its record


def error_counts(records: list["RequestRecord"], most: int = 5) -> dict[str, int]:
    """The most frequent messages of refused and failed requests, with their counts. Numbers after
    the status ("HTTP 429: ...") are masked (predicted times, queue lengths) so that alike refusals
    count together."""
    counts: dict[str, int] = {}
    for r in records:
        if r.error:
            code, sep, message = r.error.partition(": ")
            key = f"{r.status}: {code}{sep}" + re.sub(r"\d+(\.\d+)?", "N", message)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:most])


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
    error: str = ""  # the server's message for a request it refused or failed (as far as the client saw it)
    replica: str = ""  # the replica that answered, where the server names it (x-aptray-replica)

    @classmethod
    def from_token_times(cls, request_id: str, arrived_at: float, prompt_len: int, output_len: int,
                         ttft_slo: float, tbt_slo: float, token_times: list[float], status: str = FINISHED,
                         num_preemptions: int = 0, error: str = "", replica: str = "") -> "RequestRecord":
        times = list(token_times)
        return cls(request_id, arrived_at, prompt_len, output_len, ttft_slo, tbt_slo, status,
                   ttft=times[0] - arrived_at if times else None,
                   token_gaps=[b - a for a, b in zip(times, times[1:])],
                   e2e=times[-1] - arrived_at if times else None, num_tokens=len(times),
                   num_preemptions=num_preemptions, error=error[:ERROR_CHARS], replica=replica)

    @property
    def tbt_p99(self) -> float:
        return tbt_p99(self.token_gaps)

    @property
    def attained(self) -> bool:
        return self.status == FINISHED and attained(self.ttft, self.token_gaps, self.ttft_slo, self.tbt_slo)

    @property
    def tpot(self) -> float:
        """vLLM's time per output token: (last token - first token) / (tokens - 1); 0 for one token."""
        return (self.e2e - self.ttft) / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0

    def meets(self, kind: str, slo: float | None = None) -> bool:
        """Whether it finished with tokens and met one SLO kind (seconds; None: its own TTFT or TBT SLO)."""
        if self.status != FINISHED or not self.num_tokens:
            return False
        if kind == "ttft":
            return self.ttft <= (self.ttft_slo if slo is None else slo)
        if kind == "tbt":
            return self.tbt_p99 <= (self.tbt_slo if slo is None else slo)
        if kind == "tpot":
            return self.tpot <= slo
        if kind == "e2el":
            return self.e2e <= slo
        raise ValueError(f"unknown SLO kind {kind!r}: use {', '.join(GOODPUT_KINDS)}")

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


def parse_goodput(items) -> dict[str, float]:
    """`ttft:250 tbt:100` (milliseconds, vLLM's --goodput form) -> {"ttft": 0.25, "tbt": 0.1} in seconds."""
    out = {}
    for item in items or ():
        kind, sep, ms = item.partition(":")
        if not sep or kind not in GOODPUT_KINDS:
            raise ValueError(f"--goodput {item!r}: give KIND:MS with KIND one of {', '.join(GOODPUT_KINDS)}")
        value = float(ms)
        if not value > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be a positive number of milliseconds")
        out[kind] = value / 1000
    return out


def goodput_report(records: list[RequestRecord], slos: dict[str, float], duration: float) -> dict:
    """vLLM-style goodput for the given SLOs (seconds by kind): requests meeting all per second, and
    the share of requests sent meeting each."""
    good = [all(r.meets(k, v) for k, v in slos.items()) for r in records]
    n = len(records) or 1
    return {"slos_ms": {k: 1e3 * v for k, v in slos.items()},
            "request_goodput_rps": sum(good) / duration if duration > 0 else 0.0,
            "attainment": {**{k: sum(r.meets(k, v) for r in records) / n for k, v in slos.items()},
                           "all": sum(good) / n}}


def over_context(records: list[RequestRecord], context: int) -> dict:
    """Requests whose prompt + output cannot fit the model's context (a server refuses them, or cuts
    their output), apart: how many, how many did not finish, and attainment over the others."""
    over = [r for r in records if r.prompt_len + r.output_len > context]
    inside = [r for r in records if r.prompt_len + r.output_len <= context]
    return {"context": context, "requests": len(over), "rejected_for_length": sum(r.status != FINISHED for r in over),
            "attainment_within_context": attainment(inside)}


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


def summarize(records: list[RequestRecord], duration: float | None = None, goodput_slos: dict | None = None,
              context: int | None = None, stats: dict | None = None) -> dict:
    """The run's metrics. goodput_slos (seconds by kind): also vLLM-style goodput for them; context:
    requests over it reported apart (they count in attainment as misses when refused); stats (the
    scheduler's counters): its prefix-cache hit rates, where it had a prefix cache."""
    duration = run_duration(records) if duration is None else duration
    done = [r for r in records if r.status == FINISHED]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    hits = prefix_cache(stats)
    return {
        "num_requests": len(records),
        "statuses": statuses,
        **({"errors": errors} if (errors := error_counts(records)) else {}),
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
        # each request's own SLOs, one kind at a time (failed, rejected, tokenless: misses)
        "attainment_by_slo": {k: sum(r.meets(k) for r in records) / (len(records) or 1) for k in ("ttft", "tbt")},
        **({"goodput": goodput_report(records, goodput_slos, duration)} if goodput_slos else {}),
        **({"over_context": over_context(records, context)} if context else {}),
        **({"prefix_cache": hits} if hits is not None else {}),
    }
