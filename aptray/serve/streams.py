"""What a router sends its ingress: each request's stream state, and one outbox for all requests.

The engine thread turns a step's outputs into chunks (the new token ids and the text they
complete, detokenized incrementally) and hands the whole step to the Outbox in one call; the
router's event loop drains the outbox into its ingress's single Ray stream (Router.stream). That
is one Ray object per step, fewer when the ingress reads slower than steps come, instead of one
per token per request.

A chunk is a dict: {"request_id", "epoch", "token_ids", "text", "finished", "finish_reason", "usage"}
(usage: prompt_tokens, completion_tokens and, once the engine admitted it, cached_tokens),
plus "logprobs" (each token's aptray.plan.TokenLogprobs, or None where unknown) when the request
asked, and on its first chunk "prompt_logprobs" (one per prompt token) when it asked for those;
or {"request_id", "epoch", "error", "status"} when the request failed.
"""
from __future__ import annotations

import asyncio
import threading

from aptray.outputs import IncrementalDetokenizer


class ClientStream:
    """One request as its client sees it: tokens and text relayed so far."""

    __slots__ = ("attached", "epoch", "ttft_slo", "tbt_slo", "stop", "holdback", "prompt_tokens", "detok",
                 "sent_text", "cached_tokens")

    def __init__(self, tokenizer, attached: bool, ttft_slo: float, tbt_slo: float, stop: list[str],
                 prompt_tokens: int, token_ids: list[int] | None = None, epoch: int = 0,
                 skip_special_tokens: bool = True):
        """attached: a client reads it (False: resumed from Redis, no client has come back yet).
        epoch: the client's admission count, echoed in every chunk (the ingress drops stale ones).
        skip_special_tokens: the request's (SamplingParams)."""
        self.attached = attached
        self.epoch = epoch
        self.ttft_slo, self.tbt_slo = ttft_slo, tbt_slo
        self.stop = stop
        self.holdback = max(len(s) for s in stop) - 1 if stop else 0  # text that could still become a stop
        self.prompt_tokens = prompt_tokens
        self.cached_tokens: int | None = None  # its prompt tokens found in the prefix cache, once admitted
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.detok.token_ids.extend(token_ids or ())  # not decoded: only a re-attach needs their text
        self.sent_text = ""

    @property
    def token_ids(self) -> list[int]:
        return self.detok.token_ids

    def resume_at(self, token_ids: list[int], text: str) -> None:
        """A client re-attaching with the tokens and text it already has."""
        self.detok = IncrementalDetokenizer(self.detok.tokenizer, token_ids, self.detok.skip_special_tokens)
        self.sent_text = text

    def advance(self, new_token_ids: list[int]) -> str:
        """Text to relay for new tokens of a running request: whole characters only, and none of
        what could still turn out to be the start of a stop string."""
        self.detok.add(new_token_ids)
        text = self.detok.text
        if self.holdback:
            text = text[:max(0, len(text) - self.holdback)]
        return self._delta(text)

    def finish(self, token_ids: list[int], final_text: str) -> tuple[list[int], str]:
        """The last tokens and text of a finished request (the engine's text, cut at a stop string)."""
        new = token_ids[len(self.token_ids):]
        self.token_ids.extend(new)
        return new, self._delta(final_text)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent_text):
            return ""
        delta, self.sent_text = text[len(self.sent_text):], text
        return delta

    def chunk(self, rid: str, token_ids: list[int], text: str, finish_reason: str | None = None) -> dict:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)}
        if self.cached_tokens is not None:
            usage["cached_tokens"] = self.cached_tokens
        return {"request_id": rid, "epoch": self.epoch, "token_ids": token_ids, "text": text,
                "finished": finish_reason is not None, "finish_reason": finish_reason, "usage": usage}

    def error(self, rid: str, why: str, status: int) -> dict:
        return {"request_id": rid, "epoch": self.epoch, "error": why, "status": status}


class Outbox:
    """Chunks from the engine thread to the router's event loop: put() from any thread, one wake-up
    per batch of puts; get() returns everything pending as one list."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._reader = 0  # the current reader (see get)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the event loop before the first get (chunks put before are kept)."""
        if self._loop is None:
            self._event = asyncio.Event()
            self._loop = loop

    def put(self, chunks: list[dict]) -> None:
        if not chunks:
            return
        with self._lock:
            wake = not self._pending
            self._pending.extend(chunks)
        if wake and self._loop is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    def new_reader(self) -> int:
        """A new reader supersedes the previous one, whose get() then returns None."""
        self._reader += 1
        if self._event is not None:
            self._event.set()
        return self._reader

    async def get(self, reader: int) -> list[dict] | None:
        while reader == self._reader:
            with self._lock:
                if self._pending:
                    out, self._pending = self._pending, []
                    return out
                self._event.clear()
            await self._event.wait()
        return None
