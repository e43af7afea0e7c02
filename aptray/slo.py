"""SLO attainment: the one definition the server's metrics, the scheduler, the simulator and
loadgen all use, so that they never disagree on a request.

A request attains its SLO iff it finished, its TTFT is within its TTFT SLO, and the P99 of its
own gaps between tokens (the first token excluded) is within its TBT SLO. P99 is numpy's default
percentile: linear interpolation between the order statistics around 0.99 (n - 1), computed here
without numpy (the scheduler and the server stay numpy-free on this path).
"""
from __future__ import annotations

import math


def percentile(values, q: float) -> float:
    """numpy.percentile(values, q) (method "linear"), bit for bit; 0.0 for no values."""
    s = sorted(values)
    if not s:
        return 0.0
    at = q / 100 * (len(s) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(s) - 1)
    a, b, t = s[lo], s[hi], at - lo
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t  # numpy's _lerp


def tbt_p99(gaps) -> float:
    return percentile(gaps, 99)


def attained(ttft: float | None, gaps, ttft_slo: float, tbt_slo: float) -> bool:
    """TTFT within its SLO and the P99 of the request's own gaps within TBT (finished requests)."""
    return ttft is not None and ttft <= ttft_slo and tbt_p99(gaps) <= tbt_slo


def slow_gaps_to_miss(num_gaps: int) -> int:
    """Gaps over the TBT SLO at which the P99 of num_gaps gaps must exceed it, whatever the others
    are: the order statistic at floor(0.99 (n - 1)) is then over it, and the P99 lies at or above
    that one. A request that may still make num_gaps gaps is lost for good once it has this many."""
    if num_gaps < 1:
        return 1 << 30  # no gaps: TBT cannot be missed
    return num_gaps - math.floor(0.99 * (num_gaps - 1))
