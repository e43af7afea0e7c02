"""RouterLink: an ingress replica's connection to its Router actor.

Each request is admitted with one call (Router.admit); the chunks of all requests come back on
one Ray stream (Router.stream), which a pump task reads and hands to each request's Call. So a
step of the engine costs one Ray object between router and ingress, whatever the batch size.

When the router dies the link starts a new one (which resumes the replica's requests from Redis)
and every open call re-attaches with the tokens it has already relayed: the client sees a pause,
not an error (docs/RELIABILITY.md).
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError

from aptray.sampling_params import InvalidRequest
from aptray.serve.key_load import KeyLoad

logger = logging.getLogger("aptray")
MAX_REATTACH = 3  # router restarts one request may live through


class Rejected(Exception):
    def __init__(self, message: str, status: int, param: str | None = None, retry_after: int | None = None):
        """retry_after: seconds a 429 asks the client to wait (None: the app's retry_after_s)."""
        super().__init__(message)
        self.status, self.param, self.retry_after = status, param, retry_after

    @classmethod
    def of(cls, refusal: dict) -> "Rejected":
        """The refusal a dict describes ({"error", "status", "param"?, "retry_after"?}: the router's and
        RequestLimits')."""
        return cls(refusal["error"], refusal["status"], refusal.get("param"), refusal.get("retry_after"))

    def __reduce__(self):  # Ray ships exceptions by pickle: keep status, param and retry_after
        return Rejected, (str(self), self.status, self.param, self.retry_after)


@dataclass(frozen=True)
class Admission:
    """One request as Router.admit takes it."""
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict  # the request's SamplingParams fields, checked by the router
    prompt: str | None
    seen_token_ids: list[int] | None = None  # a re-attach after a router restart: the tokens relayed so far
    seen_text: str = ""  # and their text
    epoch: int = 0  # the call's admissions so far - 1: its chunks are tagged with it
    prefix: str | None = None  # the tag of the prompt prefix its client named (prefix_key.py)
    caller: str = ""  # a digest of the caller's API key, "" without keys (its share of the grammar compiles)


def invalid_as_400(fn, *args):
    """fn(*args), where an InvalidRequest is the client's 400 naming the parameter."""
    try:
        return fn(*args)
    except InvalidRequest as e:
        raise Rejected(str(e), 400, e.param) from None


@contextmanager
def counted(counter: Counter, key: str, changed=None):
    """key counts once more in counter while the block runs (gone from it at 0); changed(): called
    after each change."""
    counter[key] += 1
    if changed is not None:
        changed()
    try:
        yield
    finally:
        counter[key] -= 1
        if not counter[key]:
            del counter[key]
        if changed is not None:
            changed()


class _Lost:
    """Delivered to the calls of a router whose stream broke (after every chunk it did bring)."""

    def __init__(self, error: BaseException):
        self.error = error


class Call:
    """One request as the ingress relays it: enough to re-attach it to a new router."""

    def __init__(self, rid: str, ids: list[int], sampling: dict, prompt: str | None, owner: str = "",
                 prefix: str | None = None):
        """owner: who may abort it (the caller's identity: a digest of its API key, "" without keys);
        prefix: the tag of the prompt prefix its client named (prefix_key.py), or None."""
        self.rid, self.ids, self.sampling, self.prompt, self.owner = rid, ids, sampling, prompt, owner
        self.prefix = prefix
        self.ttft_probe = None  # the timing of its first chunk (ttft_estimate.ServingDelay), until it comes
        self.seen: list[int] = []  # token ids relayed to the client so far
        self.text = ""  # and their text
        self.router = None
        self.epoch = 0  # admissions of this call so far - 1: chunks of an earlier admission are dropped
        self._pending: list = []
        self._waiter: asyncio.Future | None = None

    def clear(self) -> None:
        self._pending = []

    def deliver(self, item) -> None:
        self._pending.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list:
        """Everything delivered since the last take (waits for at least one item)."""
        while not self._pending:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._waiter = None
        items, self._pending = self._pending, []
        return items


class RouterLink:
    def __init__(self, start_router, restart_timeout_s: float, max_per_owner: int | None = None,
                 key_load: KeyLoad | None = None):
        """start_router(): a new Router actor handle (its ready() not yet awaited); max_per_owner:
        the requests one owner (an API key) may have in flight, Rejected (429) beyond; None: no cap.
        key_load: where the other replicas' counts are (and this one's go), None: this one's alone."""
        self.start_router = start_router
        self.restart_timeout_s = restart_timeout_s
        self.max_per_owner, self.key_load = max_per_owner, key_load
        self._per_owner: Counter[str] = Counter()  # open calls by owner, "" (no keys) not counted
        self._preparing: Counter[str] = Counter()  # requests being checked and tokenized, by owner
        self.router = start_router()
        self.restarts = 0
        self.lock = asyncio.Lock()
        self._calls: dict[str, Call] = {}
        self._pump: asyncio.Task | None = None
        self._pump_router = None
        self._admissions: list[tuple] = []  # (router, request, future) waiting for the call in flight
        self._admitting = False

    # -- the shared stream --------------------------------------------------------------------
    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done() or self._pump_router is not self.router:
            self._pump_router = self.router
            self._pump = asyncio.get_running_loop().create_task(self._run_pump(self.router))

    async def _run_pump(self, router) -> None:
        calls = self._calls
        try:
            async for ref in router.stream.remote():
                for chunk in await ref:
                    call = calls.get(chunk["request_id"])
                    if call is not None and call.router is router:
                        call.deliver(chunk)
            error: BaseException = RuntimeError("the router ended its stream")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # RayActorError: the router died
            error = e
        for call in list(calls.values()):
            if call.router is router:
                call.deliver(_Lost(error))

    # -- requests -----------------------------------------------------------------------------
    async def open(self, rid: str, ids: list[int], sampling: dict, prompt: str | None, owner: str = "",
                   prefix: str | None = None) -> Call:
        """Admission: returns the call once its request is accepted (else raises Rejected)."""
        await self.check_owner(owner)
        call = Call(rid, ids, sampling, prompt, owner, prefix)
        await self._open(call, resume=False)
        return call

    def check_choices(self, owner: str, choices: int, param: str) -> None:
        """Rejected (400) where one request opens more calls (prompts x n) than owner may ever have in
        flight: a 429 would ask it to come again, and it never could."""
        if owner and self.max_per_owner is not None and choices > self.max_per_owner:
            raise Rejected(f"this request opens {choices} completions, over the {self.max_per_owner} this API key "
                           f"may have in flight", 400, param)

    async def check_owner(self, owner: str) -> None:
        """Rejected (429) while owner has max_per_owner requests in flight, open or being prepared,
        here and at the replicas that share key_load."""
        if not owner or self.max_per_owner is None:
            return
        others = 0
        if self.key_load is not None and self._held(owner) < self.max_per_owner:
            others = await self.key_load.others(owner)
        held = self._held(owner) + others
        if held >= self.max_per_owner:
            where = "" if self.key_load is None else f" ({others} at other replicas)"
            raise Rejected(f"this API key has {held} requests in flight{where} (limit {self.max_per_owner})", 429)

    @asynccontextmanager
    async def preparing(self, owner: str):
        """While a request of owner's is checked and tokenized (before open()): it counts against
        owner's cap, so a key at its cap cannot queue any more prompts on the tokenizer thread.
        Rejected (429) where owner is at its cap already."""
        await self.check_owner(owner)
        with counted(self._preparing, owner, lambda: self._publish(owner)):
            yield

    def _held(self, owner: str) -> int:
        return self._per_owner[owner] + self._preparing[owner]

    def _publish(self, owner: str) -> None:
        if owner and self.key_load is not None and self.max_per_owner is not None:
            self.key_load.publish(owner, self._held(owner))

    async def _open(self, call: Call, resume: bool) -> None:
        try:
            for attempt in range(MAX_REATTACH + 1):
                call.router = self.router
                if attempt or resume:
                    call.epoch += 1
                call.clear()  # whatever came before this admission is stale (an old router's, or its end)
                self._track(call)  # before admit: its first chunks may come before admit's answer
                self._ensure_pump()
                try:
                    first = await self._admit(call.router, Admission(
                        call.rid, call.ids, call.sampling, call.prompt, call.seen if resume else None, call.text,
                        call.epoch, call.prefix, call.owner))
                except RayActorError:
                    # it may have recorded the request before dying: from now on only re-attach
                    await self.recover(call.router)
                    resume = True
                    continue
                if "error" in first:
                    raise Rejected.of(first)
                return
            raise Rejected("the router keeps failing", 503)
        except BaseException:
            self._forget(call)
            raise

    async def _admit(self, router, request: Admission) -> dict:
        """Router.admit for one request. Requests that come while an admission call is in flight go
        together in the next one: one Ray call per round trip, not per request, under load. A
        structured request goes in a call of its own: its grammar compiles during its admission, which
        no other request should wait for."""
        if request.sampling.get("structured_output") is not None:
            return (await router.admit.remote([request]))[0]
        fut = asyncio.get_running_loop().create_future()
        self._admissions.append((router, request, fut))
        if not self._admitting:
            self._admitting = True
            asyncio.get_running_loop().create_task(self._send_admissions())
        return await fut

    async def _send_admissions(self) -> None:
        try:
            while self._admissions:
                pending, self._admissions = self._admissions, []
                routers = {id(r): r for r, _, _ in pending}
                for key, router in routers.items():  # one router but for a restart in between
                    mine = [(req, fut) for r, req, fut in pending if id(r) == key]
                    try:
                        answers = await router.admit.remote([req for req, _ in mine])
                    except Exception as e:
                        for _, fut in mine:
                            if not fut.done():
                                fut.set_exception(e)
                        continue
                    for (_, fut), answer in zip(mine, answers):
                        if not fut.done():
                            fut.set_result(answer)
        finally:
            self._admitting = False

    def open_calls(self) -> int:
        """Requests this ingress relays now (admitted or being admitted, not yet ended)."""
        return len(self._calls)

    def call(self, rid: str) -> Call | None:
        """The open call of request rid, if this ingress relays it."""
        return self._calls.get(rid)

    def _track(self, call: Call) -> None:
        if self._calls.get(call.rid) is not call:
            self._calls[call.rid] = call
            if call.owner:
                self._per_owner[call.owner] += 1
                self._publish(call.owner)

    def _forget(self, call: Call) -> None:
        if self._calls.get(call.rid) is call:
            del self._calls[call.rid]
            if call.owner:
                self._per_owner[call.owner] -= 1
                if not self._per_owner[call.owner]:
                    del self._per_owner[call.owner]
                self._publish(call.owner)

    async def chunks(self, call: Call):
        """Lists of token chunks (all that arrived together) until finished; a router that dies is
        replaced and the call re-attached. A caller that stops early (disconnect) aborts the request."""
        finished = False
        reattached = 0
        try:
            while not finished:
                batch, lost = [], None
                for item in await call.take():
                    if isinstance(item, _Lost):
                        lost = item
                        break
                    if item.get("epoch", 0) != call.epoch:
                        continue  # from before a re-attach: the new admission resends what is missing
                    if "error" in item:
                        if batch:
                            yield batch
                        raise Rejected(item["error"], item.get("status", 500))
                    call.seen.extend(item["token_ids"])
                    call.text += item["text"]
                    batch.append(item)
                    if item["finished"]:
                        finished = True
                        break
                if batch:
                    yield batch
                if lost is not None and not finished:
                    reattached += 1
                    if reattached > MAX_REATTACH:
                        raise Rejected(f"the router was lost {reattached} times: {lost.error}", 503) from lost.error
                    await self.recover(call.router)
                    await self._open(call, resume=True)
        finally:
            self._forget(call)
            if not finished and call.router is not None:
                call.router.abort.remote(call.rid)  # fire and forget: we may be inside a cancellation

    # -- router faults ------------------------------------------------------------------------
    async def recover(self, failed):
        """The router `failed` raised an actor error: make sure a live one is in place and return it."""
        async with self.lock:
            if self.router is not failed:  # another request already replaced it
                return self.router
            try:
                await asyncio.wait_for(failed.health.remote(), timeout=5)
                return failed  # alive after all: a transient error
            except Exception:
                pass
            logger.warning("router lost: starting a new one (it resumes from the store)")
            try:
                ray.kill(failed, no_restart=True)
            except Exception:
                pass
            router = self.start_router()
            try:
                await asyncio.wait_for(router.ready.remote(), timeout=self.restart_timeout_s)
            except Exception as e:
                raise Rejected(f"the router is down and could not be restarted: {e!r}", 503) from e
            self.router = router
            self.restarts += 1
            return router
