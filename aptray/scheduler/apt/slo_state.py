"""What the apt scheduler remembers per request between iterations (torch-free, O(1) per token).

- lost: a request that can no longer attain its SLO whatever happens next: its first token came
  after its TTFT SLO, or so many of its gaps exceeded its TBT SLO that the P99 of all the gaps it
  may still have (max_tokens - 1) must exceed it too. Such a request is a violator for good:
  it is served last and preempted first, instead of competing with attainable ones whenever its
  current pending time happens to be short.
- expected decode length: the mean output length of the requests finished so far (a prior until
  a few have), used to reserve blocks for the running set's growth and to weigh a new request by
  the memory it will hold, not only by its prompt. No request's own output length is known.
- decode time: the mean seconds from first to last token of the requests finished lately (an
  average over about the last LIFE_MEMORY; None until one has finished): how long a request
  admitted now is expected to hold its blocks.
- cache load: per finished request, the tokens it held on average over its decode (prompt plus
  half its output) times its decode seconds, and that squared, averaged the same way: with the
  arrival rate, the mean and variance of the tokens the running set holds at a time (Campbell's
  theorem for Poisson arrivals).
"""
from __future__ import annotations

import math

import numpy as np

from aptray.request import Request, RequestStatus
from aptray.slo import slow_gaps_to_miss

PRIOR_OUTPUT_TOKENS = 128  # expected decode length before any request has finished
PRIOR_WEIGHT = 4  # the prior counts as this many finished requests
MIN_REMAINING_SHARE = 0.1
LIFE_MEMORY = 100  # finished requests the decode-time and cache-load averages follow


class SloState:
    def __init__(self):
        self._slow: dict[str, int] = {}
        self.lost: set[str] = set()
        self._out_sum = PRIOR_OUTPUT_TOKENS * PRIOR_WEIGHT
        self._out_n = PRIOR_WEIGHT
        self._decode_s = 0.0
        self._decode_n = 0
        self._token_s = self._token2_s = 0.0  # sums of f * T and f^2 * T over finished requests

    def on_token(self, req: Request) -> None:
        """After req got a token: update its slow-gap count and whether it is lost."""
        rid = req.request_id
        if rid in self.lost:
            return
        times = req.token_times
        if len(times) == 1:
            if times[0] - req.arrival_time > req.ttft_slo:
                self.lost.add(rid)
            return
        if times[-1] - times[-2] > req.tbt_slo:
            slow = self._slow.get(rid, 0) + 1
            self._slow[rid] = slow
            if slow >= slow_gaps_to_miss(req.sampling.max_tokens - 1):
                self.lost.add(rid)

    def on_finish(self, req: Request) -> None:
        rid = req.request_id
        self._slow.pop(rid, None)
        self.lost.discard(rid)
        if req.status is not RequestStatus.FINISHED_ABORTED:
            self._out_sum += len(req.output_token_ids)
            self._out_n += 1
            if req.first_token_time is not None and req.last_token_time is not None:
                life = req.last_token_time - req.first_token_time
                held = len(req.prompt_token_ids) + len(req.output_token_ids) / 2
                keep = 1 - 1 / LIFE_MEMORY
                self._decode_s = keep * self._decode_s + life
                self._decode_n = keep * self._decode_n + 1
                self._token_s = keep * self._token_s + held * life
                self._token2_s = keep * self._token2_s + held * held * life

    @property
    def mean_output(self) -> float:
        return self._out_sum / self._out_n

    @property
    def mean_decode_seconds(self) -> float | None:
        return self._decode_s / self._decode_n if self._decode_n else None

    def held_tokens(self, arrival_rate: float) -> tuple[float, float] | None:
        """Mean and standard deviation of the tokens the running set holds at a time, for Poisson
        arrivals at arrival_rate (per second) of requests like those finished so far; None before one has."""
        if not self._decode_n:
            return None
        return (arrival_rate * self._token_s / self._decode_n,
                math.sqrt(arrival_rate * self._token2_s / self._decode_n))

    def expected_remaining_of(self, made: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Tokens each request is expected to add, from the tokens it made and may still make: what
        the mean decode length leaves after what it made (at least MIN_REMAINING_SHARE of the mean),
        never past its max_tokens."""
        mean = self.mean_output
        return np.clip(np.maximum(mean - made, MIN_REMAINING_SHARE * mean).astype(np.int64), 0, left)
