"""StepQuarantine: isolating the request behind a step that fails without naming one.

A step can fail as a whole (an exception in the model or a kernel, a shard's error reply) while
only one of its requests is to blame (an input that trips a bug). Its requests go back to the
queue as recompute preemptions and become suspects; a step then runs at most one suspect, so the
next failure points at one request. A request in MAX_FAILED_STEPS failed steps ends alone, with
an error; a suspect is cleared once a step that succeeds samples a token for it (not merely runs
one of its prefill chunks: a prompt that breaks the model in its second chunk would pass the first
forever). Under a fault that fails every step, every request still ends within MAX_FAILED_STEPS
tries: nothing loops forever.
"""
from __future__ import annotations

from collections.abc import Iterable

MAX_FAILED_STEPS = 2


class StepQuarantine:
    def __init__(self):
        self.failures: dict[str, int] = {}  # suspect request id -> failed steps it was in

    def __bool__(self) -> bool:
        return bool(self.failures)

    def blame(self, request_ids: Iterable[str]) -> set[str]:
        """Count a failed step against each of its requests; returns those to fail now."""
        doomed = set()
        for rid in set(request_ids):
            n = self.failures[rid] = self.failures.get(rid, 0) + 1
            if n >= MAX_FAILED_STEPS:
                doomed.add(rid)
                del self.failures[rid]
        return doomed

    def clear(self, request_ids: Iterable[str]) -> None:
        """These got a token from a step that succeeded: not suspects any more."""
        for rid in request_ids:
            self.failures.pop(rid, None)

    def held_back(self, request_ids: Iterable[str]) -> list[str]:
        """Of a step's requests, in plan order, the suspects beyond the first (to run later)."""
        suspects = [rid for rid in dict.fromkeys(request_ids) if rid in self.failures]
        return suspects[1:]

    def forget(self, request_id: str) -> None:
        self.failures.pop(request_id, None)
