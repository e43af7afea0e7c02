"""Arrivals of a replay, open or closed loop: requests come at their arrival times, except follow-ups
(a conversation's next turn), which come think_time after the request they follow (`after`) ends,
finished or refused, carrying what was said before them (that request's prompt and reply) as a chat
client resends it. Shared by the simulator and loadgen's clients."""
from __future__ import annotations

import heapq
from operator import attrgetter


class Arrivals:
    """Items need request_id, after (a request id or None) and think_time (seconds; None counts as 0);
    at(item) is an open-loop item's arrival time. Ties leave in the order given."""

    def __init__(self, items, at=attrgetter("arrival_time")):
        self._heap: list = []
        self._followers: dict[str, list] = {}
        self._said: dict[str, list[int]] = {}  # follow-up -> the conversation so far, when its turn comes
        self._order = 0
        for item in items:
            if item.after is None:
                self._push(at(item), item)
            else:
                self._followers.setdefault(item.after, []).append(item)

    def _push(self, when: float, item) -> None:
        heapq.heappush(self._heap, (when, self._order, item))
        self._order += 1

    def ended(self, request_id: str, now: float, said: list[int] | None = None) -> None:
        """The request ended at `now`: its follow-ups come think_time later. said: its prompt and the
        reply it got, the history its follow-ups resend (None: it got no reply to resend)."""
        for item in self._followers.pop(request_id, ()):
            self._push(now + (item.think_time or 0.0), item)
            if said is not None:
                self._said[item.request_id] = said

    def is_followed(self, request_id: str) -> bool:
        """Whether a follow-up waits on this request (its prompt is worth keeping until it ends)."""
        return request_id in self._followers

    def said_before(self, request_id: str) -> list[int] | None:
        """What was said before this follow-up (ended()'s said), once; None for others."""
        return self._said.pop(request_id, None)

    def __bool__(self) -> bool:
        """Whether a request is due to come (follow-ups of requests still running do not count)."""
        return bool(self._heap)

    @property
    def next_time(self) -> float:
        return self._heap[0][0]

    @property
    def waiting_on_others(self) -> bool:
        """Follow-ups whose request has not ended yet."""
        return bool(self._followers)

    def pop_due(self, now: float):
        """(arrival time, item) of every request due by now, in order; items may be added meanwhile."""
        while self._heap and self._heap[0][0] <= now:
            when, _, item = heapq.heappop(self._heap)
            yield when, item

    def never_sent(self) -> list:
        return [item for _, _, item in self._heap] + [item for items in self._followers.values() for item in items]
