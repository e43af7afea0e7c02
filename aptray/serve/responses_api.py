"""OpenAI's Responses API (POST /v1/responses), stateless: a response is a chat completion of the
input (instructions as the system message) rendered as a Response, or streamed as its events.

What it takes: input (text, or messages of text), instructions, max_output_tokens, temperature,
top_p, text.format (text, json_schema, json_object), stream, and the sampling extras chat takes
(seed, stop, top_k, aptray_slo...). Nothing is stored: store is accepted and previous_response_id,
background, conversation, prompt, tools, reasoning and include are refused (400) rather than ignored.
"""
from __future__ import annotations

import json
import re
import time
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError

from aptray.chat_content import join_texts
from aptray.serve.openai_api import ChatCompletionRequest, ClientModel, Text, unsupported_field
from aptray.serve.relay import Rejected

# fields of the Responses API that would need state or tools: refused unless at these no-op values
UNSUPPORTED = {"previous_response_id": (None,), "background": (None, False), "conversation": (None,),
               "prompt": (None,), "tools": (None, []), "tool_choice": (None, "none", "auto"), "reasoning": (None,),
               "include": (None, []), "max_tool_calls": (None,), "top_logprobs": (None, 0),
               "truncation": (None, "disabled"),
               # chat's, which a Response has no place for
               "n": (None, 1), "logprobs": (None, False), "prompt_logprobs": (None,), "return_token_ids": (None, False),
               "messages": (None,), "max_completion_tokens": (None,), "max_tokens": (None,)}


# chat's fields as the Responses API names them, for the refusals of the chat completion that answers it
RESPONSES_NAMES = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
                   "structured_outputs": "text.format", "response_format": "text.format"}
_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\](.*)")


class InputContent(ClientModel):
    type: Literal["input_text", "output_text", "text"]
    text: Text


class InputMessage(ClientModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[InputContent]

    def chat_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else join_texts(c.text for c in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(ClientModel):
    type: Literal["text", "json_schema", "json_object"]
    name: Text = "response"
    schema_: dict | None = Field(None, alias="schema")
    description: Text | None = None
    strict: bool | None = None


class TextConfig(ClientModel):
    format: TextFormat | None = None


class ResponsesRequest(ClientModel):
    # other fields (metadata, user, store, sampling extras) pass to the chat request or are ignored there
    model_config = ConfigDict(extra="allow")
    model: Text | None = None
    input: Text | list[InputMessage] = Field(min_length=1)
    instructions: Text | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    text: TextConfig | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completion that answers it. Rejected: a field it cannot honour (400), or extras
        chat refuses (422)."""
        name = unsupported_field(self, UNSUPPORTED)
        if name is not None:
            raise Rejected(f"{name} is not supported on /v1/responses (nothing is stored, no tools): leave it out",
                           400, name)
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        messages += [m.chat_message() for m in items]
        fields = {k: v for k, v in (self.model_extra or {}).items() if k not in UNSUPPORTED}
        fields.update(model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
                      temperature=self.temperature, top_p=self.top_p, stream=self.stream)
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise Rejected("text.format of type json_schema needs its schema", 400, "text")
            fields["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name,
                                                                                "schema": fmt.schema_}}
        elif fmt is not None and fmt.type == "json_object":
            fields["response_format"] = {"type": "json_object"}
        try:
            return ChatCompletionRequest(**fields)
        except ValidationError as e:
            errors = [{k: err.get(k) for k in ("type", "loc", "msg")} for err in e.errors()[:3]]
            raise Rejected(str(errors), 422) from None


def in_responses_terms(e: Rejected, req: ResponsesRequest) -> Rejected:
    """A refusal of the chat completion that answers req, naming req's own fields: max_output_tokens,
    text.format, instructions or input[i] (the chat's messages hold the instructions first)."""
    param = e.param
    if param in RESPONSES_NAMES:
        param = RESPONSES_NAMES[param]
    elif param is not None and (m := _MESSAGE_PARAM.fullmatch(param)):
        index = int(m.group(1)) - (1 if req.instructions else 0)
        param = "instructions" if index < 0 else (f"input[{index}]{m.group(2)}" if isinstance(req.input, list)
                                                   else "input")
    elif param == "messages":
        param = "input"
    if param == e.param:
        return e
    message = re.sub(rf"\b{re.escape(e.param)}\b", param, str(e)) if e.param in RESPONSES_NAMES else str(e)
    return Rejected(message, e.status, param, e.retry_after)


def response_body(rid: str, model: str, req: ResponsesRequest, created: int, text: str | None,
                  finish: str | None, usage: dict | None) -> dict:
    """The Response object: in progress (text None), or done with its text and the finish reason."""
    done = text is not None
    status = "in_progress" if not done else "incomplete" if finish == "length" else "completed"
    output = [] if not done else [output_message(rid, text, "incomplete" if status == "incomplete" else "completed")]
    return {"id": "resp_" + rid.split("-", 1)[-1], "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "parallel_tool_calls": False, "tool_choice": "none",
            "tools": [], "text": {"format": (req.text.format.model_dump(by_alias=True, exclude_none=True)
                                             if req.text and req.text.format else {"type": "text"})},
            "store": False, "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "input_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
                "output_tokens_details": {"reasoning_tokens": 0}}}


def output_message(rid: str, text: str, status: str) -> dict:
    return {"type": "message", "id": message_id(rid), "status": status, "role": "assistant",
            "content": [] if status == "in_progress" else [output_text(text)]}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_id(rid: str) -> str:
    return "msg_" + rid.split("-", 1)[-1]


class ResponseEvents:
    """A streamed response's events (event: type, data: the event), numbered in order."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest):
        self.rid, self.model, self.req = rid, model, req
        self.created, self.seq, self._text = int(time.time()), 0, []

    def opening(self) -> str:
        item_id = message_id(self.rid)
        body = response_body(self.rid, self.model, self.req, self.created, None, None, None)
        return "".join([self._event("response.created", response=body),
                        self._event("response.in_progress", response=body),
                        self._event("response.output_item.added", output_index=0,
                                    item=output_message(self.rid, "", "in_progress")),
                        self._event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                                    part=output_text(""))])

    def render(self, chunks: list[dict]) -> str:
        out, item_id = [], message_id(self.rid)
        for chunk in chunks:
            if chunk["text"]:
                self._text.append(chunk["text"])
                out.append(self._event("response.output_text.delta", item_id=item_id, output_index=0,
                                       content_index=0, delta=chunk["text"], logprobs=[]))
            if chunk["finished"]:
                text = "".join(self._text)
                body = response_body(self.rid, self.model, self.req, self.created, text, chunk["finish_reason"],
                                     chunk["usage"])
                out += [self._event("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                                    text=text, logprobs=[]),
                        self._event("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                                    part=output_text(text)),
                        self._event("response.output_item.done", output_index=0, item=body["output"][0]),
                        self._event("response." + body["status"], response=body)]
        return "".join(out)

    def error(self, message: str, status: int) -> str:
        return self._event("error", code=str(status), message=message, param=None)

    def _event(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False)
        self.seq += 1
        return f"event: {kind}\ndata: {data}\n\n"
