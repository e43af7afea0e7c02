"""What the pool will have to hold: the running set's growth, the queue's footprint at its end,
the expected load, and whether memory has been short lately. No request's own output length is
known: expected lengths come from the requests finished so far (SloState)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from aptray.cache.block_manager import BlockManager
from aptray.request import CacheKind
from aptray.scheduler.apt.features import (WaitingFeatures, ints, is_hidden, max_tokens_of, num_tokens_of,
                                           outputs_of, request_id)
from aptray.scheduler.apt.slo_state import SloState

ARRIVALS_SEEN = 64  # arrival times kept to estimate the arrival rate
LOAD_SIGMAS = 2.0  # KV for everyone must fit the pool this many standard deviations above the mean load


@dataclass(frozen=True)
class Growth:
    running: list       # the attainable running requests (lost ones may be preempted for room)
    final: np.ndarray   # tokens each is expected to end with
    blocks: np.ndarray  # blocks each is expected to add before it ends


class Forecast:
    def __init__(self, blocks: BlockManager, slo: SloState, hidden_on: bool):
        self.blocks = blocks
        self.slo = slo
        self.hidden_on = hidden_on
        self.arrivals: deque[float] = deque(maxlen=ARRIVALS_SEEN)
        self.short_at = -np.inf  # last time the pool was too small for what wanted to run

    def memory_is_tight(self, now: float) -> bool:
        return self.pool_was_short(now) or not self.load_fits_as_kv()

    def pool_was_short(self, now: float) -> bool:
        """Whether the pool was too small for what wanted to run within the time a request holds its
        blocks (the mean decode time of finished ones; before any has finished, at any time)."""
        if self.short_at == -np.inf:
            return False
        life = self.slo.mean_decode_seconds
        return life is None or now - self.short_at <= life

    def load_fits_as_kv(self) -> bool:
        """Whether the tokens the running set holds at a time (mean + LOAD_SIGMAS standard deviations,
        SloState.held_tokens at the recent arrival rate) fit the pool as KV."""
        a = self.arrivals
        if len(a) < 2 or a[-1] <= a[0]:
            return True
        held = self.slo.held_tokens((len(a) - 1) / (a[-1] - a[0]))
        if held is None:
            return True
        return held[0] + LOAD_SIGMAS * held[1] <= self.blocks.num_blocks * self.blocks.block_size

    def running_growth(self, running) -> Growth:
        lost = self.slo.lost
        running = [r for r in running if r.request_id not in lost] if lost else running
        n = len(running)
        if not n:
            return Growth(running, np.zeros(0, np.int64), np.zeros(0, np.int64))
        made = outputs_of(running)
        final = num_tokens_of(running) + self.slo.expected_remaining_of(made, max_tokens_of(running) - made)
        bs = self.blocks.block_size
        per = np.where(is_hidden(running), self.blocks.hidden_block_size or bs, bs)
        held = ints(self.blocks.held_each(map(request_id, running)), n)
        return Growth(running, final, np.maximum(0, -(-final // per) - held))

    def expected_growth(self, running) -> int:
        """Blocks the attainable running requests are expected to add before they end."""
        return int(self.running_growth(running).blocks.sum())

    def waiting_final(self, features: WaitingFeatures, rows: np.ndarray) -> np.ndarray:
        """Tokens each waiting request (by its row) is expected to end with."""
        return features.tokens[rows] + self.slo.expected_remaining_of(features.outputs[rows], features.left[rows])

    def blocks_at_end(self, final: np.ndarray) -> int:
        """Blocks requests ending with `final` tokens hold then in their smallest form."""
        return int(self.blocks.blocks_for(final, CacheKind.HIDDEN if self.hidden_on else CacheKind.KV).sum())
