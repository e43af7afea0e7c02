"""Token events of a streamed completion or chat, rendered from a per-request template.

Every token event of a request is the same JSON but for its text; building a pydantic model and
serialising it per token cost more than the rest of the relay. The template is the model's own
JSON (made once per request, so the shape stays what openai_api.py defines) split around the
text, which json.dumps escapes. Events that carry a finish reason or usage still go through the
models (once per request).
"""
from __future__ import annotations

import json
import time

from aptray.serve.openai_api import (ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice,
                                     CompletionResponse, Usage, finish_reason)

_MARK = "\x01aptray-text\x01"
_MARK_JSON = json.dumps(_MARK)  # how the model serialises it: the place to cut


def sse(obj) -> str:
    """One SSE event of a pydantic model or a JSON-able object."""
    body = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


def usage(chunk: dict) -> Usage:
    u = chunk["usage"]
    return Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                 total_tokens=u["prompt_tokens"] + u["completion_tokens"])


class _Events:
    def __init__(self, rid: str, model: str, include_usage: bool):
        self.rid, self.model, self.include_usage = rid, model, include_usage
        self.created = int(time.time())
        head, _, tail = self._model(_MARK, None).model_dump_json().partition(_MARK_JSON)
        self._head, self._tail = "data: " + head, tail + "\n\n"

    def text(self, text: str) -> str:
        """The SSE event of one token chunk (no finish reason)."""
        return self._head + json.dumps(text, ensure_ascii=False) + self._tail

    def render(self, chunks: list[dict]) -> str:
        """The events of chunks that arrived together, one per chunk (plus usage after the last)."""
        out = []
        for chunk in chunks:
            if not chunk["finished"]:
                out.append(self.text(chunk["text"]))
                continue
            out.append(sse(self._model(chunk["text"], finish_reason(chunk["finish_reason"]))))
            if self.include_usage:
                out.append(sse(self._usage_model(usage(chunk))))
        return "".join(out)


class CompletionEvents(_Events):
    def _model(self, text: str, reason: str | None):
        return CompletionResponse(id=self.rid, model=self.model, created=self.created,
                                  choices=[CompletionChoice(text=text, finish_reason=reason)])

    def _usage_model(self, u: Usage):
        return CompletionResponse(id=self.rid, model=self.model, created=self.created, choices=[], usage=u)


class ChatEvents(_Events):
    def _model(self, text: str, reason: str | None):
        return ChatCompletionChunk(id=self.rid, model=self.model, created=self.created,
                                   choices=[ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=reason)])

    def _usage_model(self, u: Usage):
        return ChatCompletionChunk(id=self.rid, model=self.model, created=self.created, choices=[], usage=u)

    def role(self) -> str:
        """The first event: the assistant's role, no content yet."""
        return sse(ChatCompletionChunk(id=self.rid, model=self.model, created=self.created,
                                       choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))]))
