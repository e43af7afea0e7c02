"""The inputs of one apt iteration, read once at its start and passed along frozen."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aptray.scheduler.apt.features import RunningState
from aptray.scheduler.apt.pricing import HiddenPrice


@dataclass(frozen=True)
class IterationView:
    """The sets the iteration changes (which requests run, which wait, what they hold) and the
    memory forecast are read where they are used; this is what stays fixed while it decides."""
    now: float
    w_pending: np.ndarray   # per waiting request (queue order at the start): seconds since arrival or last token
    w_violator: np.ndarray  # past its SLO now, or lost for good
    r_pending: np.ndarray   # the same per running request (running-set order at the start)
    r_violator: np.ndarray
    running: RunningState   # tokens, mid-prefill, hidden per running request
    mid_prefill: list       # the running requests mid-prefill at the start, in running-set order
    attainable: int         # U: |W| + |R| - violators, who share each step's extra time
    price: HiddenPrice      # of holding a request as hidden rather than KV
