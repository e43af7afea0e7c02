"""What apt reads of its requests, as numpy arrays: token counts, pending times, violators.

Built with C-level maps over attribute getters (no Python call per request), and for waiting
requests from rows read once when they join the queue (WaitingFeatures).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter

import numpy as np

from aptray.request import CacheKind, Request

_prompt = attrgetter("prompt_token_ids")
_output = attrgetter("output_token_ids")
_computed = attrgetter("num_computed_tokens")
_kind = attrgetter("cache_kind")
_max_tokens = attrgetter("sampling.max_tokens")
request_id = attrgetter("request_id")


def ints(values, n: int) -> np.ndarray:
    return np.fromiter(values, np.int64, n)


def num_tokens_of(reqs) -> np.ndarray:
    """Prompt + output tokens per request."""
    n = len(reqs)
    return ints(map(len, map(_prompt, reqs)), n) + ints(map(len, map(_output, reqs)), n)


def outputs_of(reqs) -> np.ndarray:
    return ints(map(len, map(_output, reqs)), len(reqs))


def computed_of(reqs) -> np.ndarray:
    return ints(map(_computed, reqs), len(reqs))


def max_tokens_of(reqs) -> np.ndarray:
    return ints(map(_max_tokens, reqs), len(reqs))


def is_hidden(reqs) -> np.ndarray:
    return np.fromiter(map(CacheKind.HIDDEN.__eq__, map(_kind, reqs)), bool, len(reqs))


def is_lost(reqs, lost: set[str]) -> np.ndarray:
    return np.fromiter(map(lost.__contains__, map(request_id, reqs)), bool, len(reqs))


def pending_and_violators(reqs, now: float, lost=None) -> tuple[np.ndarray, np.ndarray]:
    """Pending times (since the last token, since arrival before the first), and who is a violator:
    past its SLO now (TTFT before the first token, TBT after), or (given lost) lost for good."""
    n = len(reqs)
    pending = np.fromiter((now - (r.last_token_time if r.last_token_time is not None else r.arrival_time)
                           for r in reqs), float, n)
    slo = np.fromiter((r.tbt_slo if r.first_token_time is not None else r.ttft_slo for r in reqs), float, n)
    viol = pending > slo
    if lost:
        viol |= is_lost(reqs, lost)
    return pending, viol


@dataclass(frozen=True)
class RunningState:
    """Per running request, in running-set order."""
    size: np.ndarray        # prompt + output tokens
    prefilling: np.ndarray  # more than its newest token lacks cache entries (Request.is_prefilling)
    hidden: np.ndarray      # held as hidden


def running_state(running) -> RunningState:
    size = num_tokens_of(running)
    prefilling = (size - computed_of(running) > 1) | (outputs_of(running) == 0)
    return RunningState(size, prefilling, is_hidden(running))


class WaitingFeatures:
    """What apt reads of each waiting request, in arrays, read from the request once.

    A waiting request gets no token and computes nothing until it is admitted, so its pending-time
    origin, its SLO, its tokens and whether it is lost stay fixed while it waits (a preemption
    changes them: the request leaves and comes back with a fresh row). Each iteration then costs
    one dict lookup per waiting request instead of several attribute reads and branches."""

    def __init__(self):
        self.row: dict[Request, int] = {}
        self.ref = np.zeros(64)          # last token time, or arrival before the first
        self.slo = np.zeros(64)          # TBT SLO after the first token, TTFT SLO before
        self.tokens = np.zeros(64, np.int64)
        self.computed = np.zeros(64, np.int64)
        self.outputs = np.zeros(64, np.int64)
        self.left = np.zeros(64, np.int64)     # tokens it may still generate (max_tokens - outputs)
        self.lost = np.zeros(64, bool)
        self.used = 0

    def pending(self, waiting, now: float, lost: set[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pending_and_violators for waiting requests, from their rows; also their rows."""
        rows = self.rows(waiting, lost)
        pending = now - self.ref[rows]
        return pending, (pending > self.slo[rows]) | self.lost[rows], rows

    def rows(self, reqs, lost: set[str]) -> np.ndarray:
        rows = np.fromiter(map(self.row.get, reqs, repeat(-1)), np.int64, len(reqs))
        new = np.flatnonzero(rows < 0)
        if len(new) == 0:
            return rows
        # make room before adding: compacting mid-way would leave the rows read above pointing at
        # other requests' slots (a stale, longer token count planned a re-prefill past its end)
        if self.used + len(new) > len(self.ref):
            self._make_room(len(new))
            rows = np.fromiter(map(self.row.get, reqs, repeat(-1)), np.int64, len(reqs))
        for i in new:
            rows[i] = self._add(reqs[i], lost)
        return rows

    def forget(self, req: Request) -> None:
        self.row.pop(req, None)

    def _add(self, req: Request, lost: set[str]) -> int:
        i = self.used
        self.used += 1
        started = req.last_token_time is not None
        self.ref[i] = req.last_token_time if started else req.arrival_time
        self.slo[i] = req.tbt_slo if req.first_token_time is not None else req.ttft_slo
        self.tokens[i] = req.num_tokens
        self.computed[i] = req.num_computed_tokens
        self.outputs[i] = len(req.output_token_ids)
        self.left[i] = req.sampling.max_tokens - self.outputs[i]
        self.lost[i] = req.request_id in lost
        self.row[req] = i
        return i

    def _make_room(self, extra: int) -> None:
        """Drop the rows of requests gone; double the arrays until the rows kept take at most half."""
        keep = np.fromiter(self.row.values(), np.int64, len(self.row))
        size = len(self.ref)
        while 2 * (len(keep) + extra) > size:
            size *= 2
        for name in ("ref", "slo", "tokens", "computed", "outputs", "left", "lost"):
            old = getattr(self, name)
            new = np.zeros(size, old.dtype)
            new[:len(keep)] = old[keep]
            setattr(self, name, new)
        self.row = dict(zip(self.row, range(len(keep))))
        self.used = len(keep)
