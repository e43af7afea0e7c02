"""Effective throughput: the highest request rate whose SLO attainment stays >= a threshold."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class BisectionResult:
    rate: float  # highest evaluated rate with attainment >= threshold (0 if none)
    evaluated: dict[float, float] = field(default_factory=dict)  # rate -> attainment, every probe


def effective_throughput(attainment_at: Callable[[float], float], lo: float, hi: float, threshold: float = 0.9,
                         rel_tol: float = 0.02, max_probes: int = 20) -> BisectionResult:
    """Bisect over rates, assuming attainment falls as the rate grows.

    hi is doubled (within max_probes) until it misses the threshold; lo is halved until it meets it.
    Stops when the bracket is narrower than rel_tol of its upper end.
    """
    seen: dict[float, float] = {}

    def probe(rate: float) -> float:
        if rate not in seen:
            seen[rate] = attainment_at(rate)
        return seen[rate]

    while probe(lo) < threshold and len(seen) < max_probes:
        hi, lo = lo, lo / 2
    if probe(lo) < threshold:
        return BisectionResult(0.0, seen)
    while probe(hi) >= threshold and len(seen) < max_probes:
        lo, hi = hi, hi * 2
    if probe(hi) >= threshold:
        return BisectionResult(hi, seen)
    while hi - lo > rel_tol * hi and len(seen) < max_probes:
        mid = (lo + hi) / 2
        if probe(mid) >= threshold:
            lo = mid
        else:
            hi = mid
    return BisectionResult(lo, seen)


def ratio(a: float, b: float) -> str:
    """a / b as "1.23x"; "-" where either is 0 (a policy that met 90% at no rate tried)."""
    return f"{a / b:.2f}x" if a and b else "-"


def kept_at_every_rate(curve: dict[float, float], threshold: float = 0.9) -> bool:
    """Whether a sampled curve meets threshold at every rate: its crossing_rate, the highest rate, is
    then only a lower bound. (A curve that dips below and comes back crosses where it first dips.)"""
    return min(curve.values()) >= threshold


def at_least(x: float, is_bound: bool, spec: str = ".2f") -> str:
    """x formatted by spec, with ">= " before it where it is only a lower bound (kept_at_every_rate)."""
    return (">= " if is_bound else "") + format(x, spec)


def bounded_ratio(a: float, b: float, a_is_bound: bool, b_is_bound: bool) -> str:
    """ratio(a, b) where a or b may be only a lower bound (kept_at_every_rate): ">= " before
    it where a is one, "-" where b is one."""
    if b_is_bound:
        return "-"
    return (">= " if a_is_bound and a and b else "") + ratio(a, b)


def crossing_rate(curve: dict[float, float], threshold: float = 0.9) -> float:
    """On a sampled curve: the rate where attainment crosses threshold, interpolated linearly between
    the last rate that meets it and the next one; 0 if the lowest rate already misses."""
    rates = sorted(curve)
    best = 0.0
    for a, b in zip(rates, rates[1:] + [None]):
        if curve[a] < threshold:
            break
        best = a
        if b is not None and curve[b] < threshold:
            return a + (b - a) * (curve[a] - threshold) / (curve[a] - curve[b])
    return best
