"""The run's wall-clock budget: one deadline for the whole check, a share of what is left for each stage,
and a pace that skips the cases of a stage that would no longer fit."""
from __future__ import annotations

import signal
import time
import traceback

STACK_FRAMES = 8  # of the main thread's stack when the deadline passes


class DeadlineExceeded(Exception):
    """Raised in the main thread when the run's deadline passes in the middle of a stage."""


class Budget:
    def __init__(self, seconds: float, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + seconds
        self.in_stage = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def stage(self, weight: float, weights_left: float, reserve_s: float) -> "Pace":
        """A Pace for the next stage: its weight's share of the time left (minus what writing the
        report needs); time a stage does not use goes to the stages after it."""
        share = max(0.0, self.left() - reserve_s) * weight / max(weights_left, weight)
        return Pace(time.monotonic() + share, self)

    def arm_watchdog(self, reserve_s: float) -> None:
        """SIGALRM reserve_s before the deadline raises DeadlineExceeded inside a stage that overran
        (a stage's own checks come first; this catches one long call)."""
        def on_alarm(signum, frame):
            if self.in_stage:  # where the stage was: a hang shows in the report, not only its length
                where = "".join(traceback.format_stack(frame)[-STACK_FRAMES:])
                raise DeadlineExceeded(f"the run's budget ran out ({self.elapsed():.0f} s), in:\n{where}")
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left() - reserve_s))

    @staticmethod
    def disarm_watchdog() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


class Pace:
    """A stage's deadline. each() yields work items while the next one is expected to fit, taking the
    previous item's time (first_estimate_s for the first) as the estimate: items come in families of
    similar cost, and the first of a family pays one-off kernel compilation that the rest do not.
    skipped counts the items left out."""

    def __init__(self, deadline: float, budget: Budget):
        self.deadline = deadline
        self.budget = budget
        self.skipped = 0

    def left(self) -> float:
        return min(self.deadline - time.monotonic(), self.budget.left())

    def each(self, items, first_estimate_s: float):
        items = list(items)
        estimate = first_estimate_s
        for i, item in enumerate(items):
            if self.left() < estimate:
                self.skipped += len(items) - i
                return
            t0 = time.monotonic()
            yield item
            estimate = time.monotonic() - t0
