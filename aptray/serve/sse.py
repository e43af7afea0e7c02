"""Token events of a streamed completion or chat, rendered from a per-request template.

Every token event of a request is the same JSON but for its text; building a pydantic model and
serialising it per token cost more than the rest of the relay. The template is the model's own
JSON (made once per request, so the shape stays what openai_api.py defines) split around the
text, which json.dumps escapes, and the event's token ids where the client asked for them. Events
that carry a finish reason, usage or the prompt's ids still go through the models (once per
request), as do all events of a request that asked for log-probabilities.
"""
from __future__ import annotations

import json
import time

from aptray.serve.openai_api import (ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice,
                                     CompletionResponse, LogprobsRenderer, PromptTokensDetails, Usage, chunk_logprobs,
                                     finish_reason)

_MARK = "\x01aptray-text\x01"
_MARK_JSON = json.dumps(_MARK)  # how the model serialises it: the place to cut
_IDS_MARK = [-7_017_017]  # no token id: where an event's token ids go
_IDS_MARK_JSON = json.dumps(_IDS_MARK)


def sse(obj) -> str:
    """One SSE event of a pydantic model or a JSON-able object."""
    body = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


def usage(*last_chunks: dict, n: int | None = None) -> Usage:
    """The usage of a request's choices, from each one's last chunk in choice order; n: choices per
    prompt, where a completion has several prompts (None: the choices share one prompt)."""
    firsts = last_chunks[::n or len(last_chunks)]  # one choice of each prompt
    prompt = sum(c["usage"]["prompt_tokens"] for c in firsts)
    completion = sum(c["usage"]["completion_tokens"] for c in last_chunks)
    cached = [c["usage"].get("cached_tokens") for c in firsts]
    details = None if None in cached else PromptTokensDetails(cached_tokens=sum(cached))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=details)


class _Events:
    """prompt_ids: the prompt's token ids where the client asked for token ids (return_token_ids):
    every event then carries its tokens' ids, and the first one the prompt's. logprobs: where the
    client asked for log-probabilities, what renders them. echo: the prompt's text and token ids; the
    text is the first event (with the prompt's log-probabilities, which come with the first chunk).
    index: the choice the events are of (n > 1). usage_prompt_tokens: the prompt's token count where
    every event carries the choice's usage so far (vLLM's continuous_usage_stats), else None."""

    def __init__(self, rid: str, model: str, include_usage: bool, prompt_ids: list[int] | None = None,
                 logprobs: LogprobsRenderer | None = None, echo: tuple[str, list[int]] | None = None,
                 index: int = 0, usage_prompt_tokens: int | None = None):
        self.rid, self.model, self.include_usage = rid, model, include_usage
        self.logprobs, self._echo, self.index = logprobs, echo, index
        self.usage_prompt_tokens = usage_prompt_tokens
        self.created = int(time.time())
        self.with_ids, self._prompt_ids = prompt_ids is not None, prompt_ids
        template = self._model(_MARK, None, _IDS_MARK if self.with_ids else None).model_dump_json()
        head, _, tail = template.partition(_MARK_JSON)
        self._mid, _, tail = tail.partition(_IDS_MARK_JSON) if self.with_ids else ("", "", tail)
        self._head, self._tail = "data: " + head, tail + "\n\n"

    def text(self, text: str, ids: list[int] = ()) -> str:
        """The SSE event of one token chunk (no finish reason)."""
        body = json.dumps(text, ensure_ascii=False)
        if self.with_ids:
            body += self._mid + json.dumps(ids, separators=(",", ":"))
        return self._head + body + self._tail

    def prompt_ids_once(self) -> list[int] | None:
        """The prompt's ids for the first event that asks, then None."""
        ids, self._prompt_ids = self._prompt_ids, None
        return ids

    def render(self, chunks: list[dict]) -> str:
        """The events of chunks that arrived together, one per chunk (plus usage after the last)."""
        out = []
        if self._echo is not None and chunks:
            (text, prompt_ids), prompt_lps = self._echo, chunks[0].get("prompt_logprobs")
            lps = self._logprobs(prompt_ids, prompt_lps) if self.logprobs and prompt_lps else None
            out.append(self.event(self._model(text, None, [] if self.with_ids else None, self.prompt_ids_once(),
                                              lps)))
            self._echo = None
        fast = self._prompt_ids is None and self.logprobs is None and self.usage_prompt_tokens is None
        for chunk in chunks:
            ids = chunk["token_ids"] if self.with_ids else None
            if not chunk["finished"] and fast:
                out.append(self.text(chunk["text"], ids))
                continue
            reason = finish_reason(chunk["finish_reason"]) if chunk["finished"] else None
            lps = None if self.logprobs is None else self._logprobs(chunk["token_ids"], chunk_logprobs(chunk))
            out.append(self.event(self._model(chunk["text"], reason, ids, self.prompt_ids_once(), lps), chunk))
            if chunk["finished"] and self.include_usage:
                out.append(sse(self._usage_model(usage(chunk))))
        return "".join(out)

    def event(self, model, chunk: dict | None = None) -> str:
        """model's SSE event; with continuous usage, carrying the choice's usage as of chunk (before any
        chunk: the prompt's alone)."""
        if self.usage_prompt_tokens is not None:
            model.usage = usage(chunk) if chunk is not None else Usage(
                prompt_tokens=self.usage_prompt_tokens, completion_tokens=0, total_tokens=self.usage_prompt_tokens)
        return sse(model)


class CompletionEvents(_Events):
    def _model(self, text: str, reason: str | None, ids=None, prompt_ids=None, logprobs=None):
        return CompletionResponse(id=self.rid, model=self.model, created=self.created, choices=[
            CompletionChoice(index=self.index, text=text, token_ids=ids, logprobs=logprobs, finish_reason=reason,
                             prompt_token_ids=prompt_ids)])

    def _logprobs(self, token_ids: list[int], logprobs: list):
        return self.logprobs.completion(token_ids, logprobs)

    def _usage_model(self, u: Usage):
        return CompletionResponse(id=self.rid, model=self.model, created=self.created, choices=[], usage=u)


class ChatEvents(_Events):
    def _model(self, text: str, reason: str | None, ids=None, prompt_ids=None, logprobs=None):
        return self.delta_model(ChatDelta(content=text), reason, ids, prompt_ids, logprobs)

    def delta_model(self, delta: ChatDelta, reason: str | None, ids=None, prompt_ids=None, logprobs=None):
        return ChatCompletionChunk(id=self.rid, model=self.model, created=self.created, prompt_token_ids=prompt_ids,
                                   choices=[ChatChunkChoice(index=self.index, delta=delta, token_ids=ids,
                                                            logprobs=logprobs, finish_reason=reason)])

    def _logprobs(self, token_ids: list[int], logprobs: list):
        return self.logprobs.chat(token_ids, logprobs)

    def _usage_model(self, u: Usage):
        return ChatCompletionChunk(id=self.rid, model=self.model, created=self.created, choices=[], usage=u)

    def role(self) -> str:
        """The first event: the assistant's role, no content yet (and the prompt's ids, if asked)."""
        return self.event(ChatCompletionChunk(id=self.rid, model=self.model, created=self.created,
                                              prompt_token_ids=self.prompt_ids_once(),
                                              choices=[ChatChunkChoice(index=self.index,
                                                                       delta=ChatDelta(role="assistant", content=""),
                                                                       token_ids=[] if self.with_ids else None)]))
