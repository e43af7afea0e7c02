"""StoreWriter: the router's only path to Redis, in its own thread.

The engine thread never waits on Redis: it queues token and finish records and goes on. The
writer keeps a mirror of every in-flight request, so when Redis comes back after an outage (a
restart may have emptied it) one resync rewrites the whole state and nothing is lost. Admission
is the one synchronous write: a request is accepted only once its metadata is in Redis, and
while Redis is away new requests are refused at once (503) instead of waiting on it. A write with
admissions that fails gets one immediate resync before they are refused.

Writes are batched: whatever is queued when the writer gets to it (token records wait up to
COALESCE_S for company) goes in one transaction, with each request's tokens merged over steps.
Redis thus lags the engine by a few tens of milliseconds at most; after a router restart the
clients' re-attach fills that gap (docs/RELIABILITY.md).
"""
from __future__ import annotations

import concurrent.futures
import copy
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import Callable

from aptray.serve.store import RequestMeta, RequestStore

logger = logging.getLogger("aptray")

RETRY_S = 0.5  # how often to try Redis again while it is away
HEARTBEAT_S = 5.0
HEARTBEAT_TTL_S = 30
MAX_PENDING_FINISHES = 10_000  # finishes kept for the resync; older ones expire in Redis anyway
COALESCE_S = 0.02  # token and finish records wait this long for others to share their round trip
MAX_BATCH = 4096  # records per round trip
URGENT = ("admit", "flush", "stop")  # records someone waits on: written at once


class StoreUnavailable(RuntimeError):
    pass


def _start(meta: RequestMeta | None, step: list) -> int | None:
    """The tokens a request's Redis list holds before step's: the mirror's count less step's (None: not
    mirrored, appended without the guard)."""
    return None if meta is None else len(meta.output_token_ids) - len(step[0])


class StoreWriter:
    def __init__(self, store: RequestStore, observe_write: Callable[[float], None] | None = None):
        self.store = store
        self.observe_write = observe_write  # seconds of each write's round trip (the router's metrics)
        self.mirror: dict[str, RequestMeta] = {}
        self.pending_finishes: OrderedDict[str, str] = OrderedDict()
        self.healthy = True
        self.outages = 0  # times Redis went away (metrics, tests)
        self.divergences = 0  # times Redis was found not to hold what the router wrote
        self.last_error: str | None = None
        self._last_try = 0.0
        self._last_beat = 0.0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="aptray-store", daemon=True)
        self._thread.start()

    # -- callers (any thread) -----------------------------------------------------------------
    def admit(self, meta: RequestMeta) -> concurrent.futures.Future:
        """Write a new request's metadata; the future fails with StoreUnavailable if Redis is away."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put(("admit", meta, fut))
        return fut

    def track(self, meta: RequestMeta, write: bool = False) -> None:
        """Mirror a resumed request; write=True also (re)writes it, for one Redis may not hold."""
        self._q.put(("track", meta, write))

    def tokens(self, new_tokens: dict[str, list[int]]) -> None:
        if new_tokens:
            self._q.put(("tokens", new_tokens, time.time()))

    def finish(self, rid: str, status: str) -> None:
        self._q.put(("finish", rid, status))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was handled (written, or mirrored while Redis is away)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put(("flush", fut))
        try:
            fut.result(timeout)
            return True
        except concurrent.futures.TimeoutError:
            return False

    def close(self) -> None:
        self._stop = True
        self._q.put(("stop",))
        self._thread.join(timeout=10)

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            try:
                first = self._q.get(timeout=RETRY_S)
            except queue.Empty:
                first = None
            if first is not None:
                self._apply(self._collect(first))
            self._maybe_heartbeat()
            if not self.healthy:
                self._try_resync()

    def _collect(self, first) -> list:
        """first and what joins it: token and finish records wait up to COALESCE_S for company (one
        round trip for many steps and requests), an admission or a flush goes at once with all pending."""
        items = [first]
        deadline = None if first[0] in URGENT else time.monotonic() + COALESCE_S
        while len(items) < MAX_BATCH:
            try:
                if deadline is None:
                    item = self._q.get_nowait()
                else:
                    item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            items.append(item)
            if item[0] in URGENT:
                deadline = None
        return items

    def _apply(self, items: list) -> None:
        """One Redis transaction for the whole batch, in queue order; the mirror follows every record
        whether Redis takes it or not (a resync rewrites it after an outage)."""
        if not self.healthy and any(item[0] == "admit" for item in items):
            self._try_resync()
        batch = self.store.batch() if self.healthy else None
        admitted, done, finished = [], [], []
        steps: dict[str, list] = {}  # rid -> [tokens, time of the last, first tokens?, time of the first]
        for item in items:
            kind = item[0]
            if kind == "admit":
                _, meta, fut = item
                if batch is None:
                    fut.set_exception(StoreUnavailable(f"the request store (Redis) is unavailable: {self.last_error}"))
                    continue
                batch.add(meta)
                self.mirror[meta.request_id] = copy.deepcopy(meta)
                admitted.append((meta, fut))
            elif kind == "track":
                _, meta, write = item
                self.mirror[meta.request_id] = copy.deepcopy(meta)
                if write and batch is not None:
                    batch.add(meta)
            elif kind == "tokens":
                _, new_tokens, now = item
                for rid, toks in new_tokens.items():
                    if not toks:
                        continue
                    m = self.mirror.get(rid)
                    step = steps.get(rid)
                    if step is None:
                        step = steps[rid] = [[], now, None if m is None else not m.output_token_ids, now]
                    step[0].extend(toks)
                    step[1] = now
                    if m is not None:
                        m.output_token_ids.extend(toks)
                        m.first_token_time = m.first_token_time or now
                        m.last_token_time, m.status = now, "running"
            elif kind == "finish":
                _, rid, status = item
                m = self.mirror.pop(rid, None)
                step = steps.pop(rid, None)
                if batch is not None:
                    if step is not None:  # its tokens first: the finish shortens the TTL and must come last
                        batch.tokens(rid, *step, start=_start(m, step))
                    batch.finish(rid, status, time.time())
                finished.append((rid, status))
            elif kind == "flush":
                done.append(item[1])
        if batch is not None:
            for rid, step in steps.items():
                batch.tokens(rid, *step, start=_start(self.mirror.get(rid), step))
            skipped = self._write(batch.execute)
            if skipped is None:
                batch = None
            elif skipped:
                self._diverged(skipped)
        if batch is None:  # replayed by the resync once Redis is back
            for rid, status in finished:
                self.pending_finishes[rid] = status
            while len(self.pending_finishes) > MAX_PENDING_FINISHES:
                self.pending_finishes.popitem(last=False)
            if admitted:  # one resync at once, which writes them from the mirror: a stall of a few
                self._last_try = 0.0  # seconds (a starved Redis) then delays them instead of refusing them
                self._try_resync()
        for meta, fut in admitted:
            if batch is None and not self.healthy:  # refused: nobody will generate for it
                self.mirror.pop(meta.request_id, None)
                fut.set_exception(StoreUnavailable(f"the request store (Redis) is unavailable: {self.last_error}"))
            else:
                fut.set_result(True)
        for fut in done:
            fut.set_result(True)

    def _write(self, write):
        """write()'s result, or None if Redis failed it."""
        start = time.perf_counter()
        try:
            return write()
        except Exception as e:  # redis.ConnectionError, TimeoutError, a restarted server's LOADING...
            self._went_away(e)
            return None
        finally:
            if self.observe_write is not None:
                self.observe_write(time.perf_counter() - start)

    def _diverged(self, skipped: int) -> None:
        """Token appends found their lists at another length than the mirror's: Redis no longer mirrors
        the router (a timed-out transaction that ran after a resync, a restart between two writes).
        The batch's other writes stand; a resync now rewrites every in-flight request."""
        logger.warning("request store diverged from the router (%d token appends skipped): resyncing", skipped)
        self.divergences += 1
        self.healthy, self.last_error, self._last_try = False, "diverged", 0.0

    def _went_away(self, e: Exception) -> None:
        if self.healthy:
            self.outages += 1
            logger.warning("request store unavailable (%r): mirroring in memory until it is back", e)
        self.healthy, self.last_error, self._last_try = False, repr(e), time.monotonic()

    def _try_resync(self) -> None:
        if time.monotonic() - self._last_try < RETRY_S:
            return
        self._last_try = time.monotonic()
        try:
            self.store.resync(list(self.mirror.values()), dict(self.pending_finishes))
            self.store.heartbeat(HEARTBEAT_TTL_S)
        except Exception as e:
            self.last_error = repr(e)
            return
        logger.warning("request store is back: rewrote %d in-flight and %d finished requests",
                       len(self.mirror), len(self.pending_finishes))
        self.pending_finishes.clear()
        self.healthy, self.last_error = True, None

    def _maybe_heartbeat(self) -> None:
        if self.healthy and time.monotonic() - self._last_beat > HEARTBEAT_S:
            self._last_beat = time.monotonic()
            self._write(lambda: self.store.heartbeat(HEARTBEAT_TTL_S))
