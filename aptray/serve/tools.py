"""Tool calls on chat (OpenAI's tools and tool_choice), held by a structured output.

With tool_choice "required" the reply is a JSON array of one call or more, each {"name": one of the
tools, "parameters": its arguments under the tool's schema}; with a named function it is that
function's arguments. The structure makes the model's text exactly that, whatever its own tool-call
format, and the reply carries it as message.tool_calls with finish_reason "tool_calls". tool_choice
"none" answers in text; the tools still go to the chat template. "auto" lets the model choose
between text and calls in its own format: it needs the app's tool_call_parser (tool_parser.py, as
vLLM's --tool-call-parser), and without one it is refused rather than answered in text that ignores
the tools.
"""
from __future__ import annotations

import inspect
import json
import re
import uuid
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from aptray.sampling_params import InvalidRequest, check_continuation
from aptray.serve import tool_parser
from aptray.serve.openai_api import ChatDelta, FunctionCall, ToolCall, chunk_logprobs, finish_reason
from aptray.serve.sse import ChatEvents, sse, usage

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolReply:
    """What the reply is: "text", "required" (calls of any of the tools), "named" (a call of name) or
    "auto" (text, calls in the model's own format, or both; names: the tools it may call, parser: the
    format's name in tool_parser.PARSERS). single: at most one call (parallel_tool_calls false)."""
    mode: str = "text"
    name: str | None = None
    names: tuple[str, ...] = ()
    parser: str | None = None
    single: bool = False

    @property
    def shows_special_tokens(self) -> bool:
        """Whether the reply's text must keep special tokens: the format's calls open with one."""
        return self.mode == "auto" and tool_parser.PARSERS[self.parser].SHOWS_SPECIAL_TOKENS

    def parse(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """(the reply's text content, the calls it makes): (text, None) where it makes none (text, or
        JSON cut short)."""
        value = tool_parser.json_value(text) if self.mode in ("named", "required") else None
        if self.mode == "named":
            return (None, [_call(self.name, text)]) if value is not None else (text, None)
        if self.mode == "required":
            return (None, [_call(c["name"], json.dumps(c["parameters"])) for c in value]) if value else (text, None)
        if self.mode == "auto":
            content, calls = tool_parser.PARSERS[self.parser].parse(text, self.names)
            calls = calls[:1] if self.single else calls  # the model's first call, as vLLM answers
            return (content, [_call(name, arguments) for name, arguments in calls]) if calls else (text, None)
        return text, None


def plan(tools, tool_choice, parser: str | None = None, parallel: bool = True) -> tuple[ToolReply, dict | None]:
    """(what the reply is, the structured output that holds it: StructuredOutput's fields, or None)
    of a request's tools and tool_choice; parser: the app's tool_call_parser, which "auto" needs;
    parallel: parallel_tool_calls (false: one call at most). InvalidRequest where they cannot be served."""
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools", "tools")
    schemas = {}
    for tool in tools:
        name = tool.function.name
        if not _NAME.fullmatch(name):
            raise InvalidRequest(f"a tool's name is 1-64 letters, digits, '_' or '-', got {name!r}", "tools")
        if name in schemas:
            raise InvalidRequest(f"two tools are named {name!r}", "tools")
        schemas[name] = tool.function.parameters if tool.function.parameters is not None else _NO_ARGUMENTS
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice == "none" or (choice == "auto" and not tools):  # what clients send by default
        return ToolReply(), None
    if not tools:
        raise InvalidRequest(f"tool_choice {_describe(choice)} needs tools", "tool_choice")
    if choice == "auto" and parser is not None:
        return ToolReply("auto", names=tuple(schemas), parser=parser, single=not parallel), None
    if choice == "auto":
        raise InvalidRequest("tool_choice auto needs a parser of this model's own tool-call format, which this "
                             "server was not started with (build_app's tool_call_parser): send tool_choice "
                             "\"required\" or a named function (the reply is then held to the tools' schemas), or "
                             "\"none\"", "tool_choice")
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, schema in schemas.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **({} if parallel else {"maxItems": 1})}
        return ToolReply("required"), {"kind": "json", "spec": json.dumps(schema)}
    name = choice.function.name
    if name not in schemas:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolReply("named", name), {"kind": "json", "spec": json.dumps(schemas[name])}


def chat_sampling(req, parser: str | None) -> tuple[ToolReply, dict]:
    """What a chat request's reply is (text, or tool calls), and its sampling dict, whose "tools" are
    for the chat template (taken out before admission). The tools' structure holds the reply where
    tool_choice asks for calls; parser: the app's tool_call_parser. InvalidRequest where they
    cannot be served."""
    check_continuation(req.continue_final_message, req.add_generation_prompt)
    reply, held = plan(req.tools, req.tool_choice, parser, req.parallel_tool_calls is not False)
    sampling = req.sampling(1)
    if held is not None:
        if sampling["structured_output"] is not None:
            raise InvalidRequest("tool_choice holds the reply to the tools' schemas: send no response_format or "
                                 "structured_outputs with it", "tool_choice")
        sampling["structured_output"] = held
    if reply.shows_special_tokens:  # the calls open with a special token: the text keeps them
        sampling["skip_special_tokens"] = False
    sampling["tools"] = tool_specs(req.tools)
    return reply, sampling


def tool_specs(tools) -> list[dict] | None:
    """The request's tools as the chat template takes them."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


# what chat_template_kwargs may not set: apply_chat_template's own arguments (a template of the
# client's among them) and the variables it renders the conversation with
_TEMPLATE_ARGUMENTS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {
    "messages", "conversation", "tools", "documents"}


def template_kwargs(kwargs: dict | None) -> dict:
    """chat_template_kwargs, the template's own variables (a model's enable_thinking, say);
    InvalidRequest where one would set what the server sets."""
    taken = sorted(set(kwargs or {}) & _TEMPLATE_ARGUMENTS)
    if taken:
        raise InvalidRequest(f"chat_template_kwargs cannot set {taken[0]!r}", "chat_template_kwargs")
    return kwargs or {}


def chat_prompt(tokenizer, req, tool_specs: list[dict] | None) -> tuple[str, list[int]]:
    """The conversation (and the tools) through the model's chat template, and its token ids.
    InvalidRequest where the template refuses them (roles, order) or its kwargs would set what the
    server sets."""
    try:
        text = tokenizer.apply_chat_template(
            template_messages(req.messages), tools=tool_specs, tokenize=False,
            add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
            **template_kwargs(req.chat_template_kwargs))
    except InvalidRequest:
        raise
    except Exception as e:  # the template refused these messages: the client's error
        raise InvalidRequest(f"the chat template refused the messages: {e}", "messages") from e
    return text, tokenizer.encode(text, add_special_tokens=req.add_special_tokens)


def template_messages(messages) -> list[dict]:
    """The chat's messages as the chat template takes them: content as a string (text parts joined),
    an assistant's tool call's arguments as an object, as transformers' templates expect (the API
    carries them as JSON text)."""
    out = [m.model_dump(exclude_none=True) for m in messages]
    for i, (message, m) in enumerate(zip(messages, out)):
        if isinstance(message.content, list):
            m["content"] = message.text(_content_param(i))
        for call in m.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                arguments = tool_parser.json_value(function["arguments"])
                function["arguments"] = arguments if isinstance(arguments, dict) else function["arguments"]
    return out


def chat_chars(messages, tool_specs: list[dict] | None) -> int:
    """A chat's size before tokenizing (limits.size_error): its messages' and tools' characters."""
    try:
        return sum(m.chars(_content_param(i)) for i, m in enumerate(messages)) + len(json.dumps(tool_specs))
    except RecursionError:
        raise InvalidRequest("the messages or tools nest too deep", "messages") from None


def _content_param(index: int) -> str:
    return f"messages[{index}].content"


def _describe(choice) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


def _call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


class ToolCallEvents(ChatEvents):
    """A streamed reply of tool calls. Named: its first piece of text opens the call (id, name) and
    every piece is the next part of its arguments. Required: the calls come whole in the last event,
    once the array is complete (the names are known only as the JSON goes). Auto: text goes out as
    it comes until a call's opening tag (what could begin one waits for the next piece), or, in a
    format whose calls are the whole reply, while its head could be a call (tool_parser.split); from
    there the calls come whole in the last event. A reply cut short (length, abort), or whose calls
    do not parse, sends what it held back as text."""

    def __init__(self, reply: ToolReply, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reply, self._text, self._opened = reply, [], None
        self._sent = 0  # characters of auto's text sent as content
        self._unsent = ""  # auto's text after them, while no call has begun: what split() reads
        self._in_calls = reply.mode == "required"  # nothing goes out as it comes

    def render(self, chunks: list[dict]) -> str:
        out = []
        for chunk in chunks:
            self._text.append(chunk["text"])
            ids = chunk["token_ids"] if self.with_ids else None
            lps = None if self.logprobs is None else self._logprobs(chunk["token_ids"], chunk_logprobs(chunk))
            delta, reason = self._piece(chunk["text"]), None
            if chunk["finished"]:
                delta, reason = self._last_delta(chunk, delta)
            if delta is not None or reason is not None or ids or lps:
                out.append(self.event(self.delta_model(delta or ChatDelta(), reason, ids, logprobs=lps), chunk))
            if chunk["finished"] and self.include_usage:
                out.append(sse(self._usage_model(usage(chunk))))
        return "".join(out)

    def _piece(self, new: str) -> ChatDelta | None:
        """What goes out now: a named call's next arguments (new, the chunk's text), or auto's text."""
        if self._in_calls:
            return None
        if self.reply.mode == "named":
            return self._arguments(new)
        self._unsent += new  # held back at most a few characters: no join of the whole reply per chunk
        end, self._in_calls = tool_parser.PARSERS[self.reply.parser].split(self._unsent, self._sent > 0,
                                                                           self.reply.names)
        return self._content(self._unsent[:end])

    def _content(self, piece: str) -> ChatDelta | None:
        self._sent, self._unsent = self._sent + len(piece), self._unsent[len(piece):]
        return ChatDelta(content=piece) if piece else None

    def _arguments(self, piece: str) -> ChatDelta | None:
        if not piece:
            return None
        call = {"index": 0, "function": {"arguments": piece}}
        if self._opened is None:
            self._opened = _call(self.reply.name, "").id
            call = {"index": 0, "id": self._opened, "type": "function",
                    "function": {"name": self.reply.name, "arguments": piece}}
        return ChatDelta(tool_calls=[call])

    def _last_delta(self, chunk: dict, delta: ChatDelta | None) -> tuple[ChatDelta | None, str]:
        text = "".join(self._text)
        calls = self.reply.parse(text)[1] if chunk["finish_reason"] == "stop" else None
        if calls is None:  # cut short, or no calls: what is held back goes out as text
            if self.reply.mode != "named":
                delta = _merged(delta, self._content(text[self._sent:]))
            return delta, finish_reason(chunk["finish_reason"])
        if self.reply.mode != "named":
            delta = _merged(delta, ChatDelta(tool_calls=[{"index": i, "id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments}} for i, c in enumerate(calls)]))
        return delta, "tool_calls"


def _merged(first: ChatDelta | None, second: ChatDelta | None) -> ChatDelta | None:
    """One delta of two pieces (text, then text or calls)."""
    if first is None or second is None:
        return first or second
    return ChatDelta(content=(first.content or "") + (second.content or "") or None,
                     tool_calls=second.tool_calls)
