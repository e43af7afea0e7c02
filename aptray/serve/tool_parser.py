"""Tool calls written in a model's own format, for tool_choice "auto", where the model chooses
between text and calls (build_app's tool_call_parser names the format its chat template teaches,
as vLLM's --tool-call-parser does).

"hermes": Hermes 2 and 3, Qwen2.5 and Qwen3. After any text come one block or more of

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the last may lack its closing tag where the output ends).

"llama3_json": Llama 3.1 to 3.3 with JSON tool calling. The whole reply is one JSON object or more,
{"name": "get_weather", "parameters": {"city": "Paris"}} ("arguments" is read too), separated by
";" and optionally after <|python_tag|> (a special token, so usually not in the text).

"pythonic": Llama 3.2 and 4, and other models taught to answer in Python. The whole reply is a
list of calls with keyword arguments of Python literals, [get_weather(city="Paris"), now()],
optionally between <|python_start|> and <|python_end|>.

A reply is calls only where every call names one of the request's tools with arguments that are
an object; any other reply is text as the model wrote it, so that a client never receives a call
the model did not make.
"""
from __future__ import annotations

import ast
import json
import re


def json_value(text: str):
    """The JSON value text holds; None where it holds none (not JSON, or nested past Python's
    recursion limit, which raises RecursionError rather than ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _arguments(value) -> str | None:
    """A call's arguments as JSON text; None where they are not an object JSON can write."""
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _json_call(value, names: tuple[str, ...], *argument_keys: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call written as a JSON object naming one of names, its
    arguments an object under the first of argument_keys it has (none: no arguments); None otherwise."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = _arguments(next((value[k] for k in argument_keys if k in value), {}))
    return None if arguments is None else (value["name"], arguments)


class Hermes:
    OPEN = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    def parse(self, text: str, names: tuple[str, ...]) -> tuple[str | None, list[tuple[str, str]]]:
        """(the text before the calls, None where there is none; [(name, arguments as JSON text)]);
        (text, []) where the reply makes no call."""
        at = text.find(self.OPEN)
        if at < 0:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text, at):
            call = _json_call(json_value(body), names, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        return (text[:at] if text[:at].strip() else None), calls

    def split(self, unsent: str, started: bool) -> tuple[int, bool]:
        """Streaming: (how much of unsent, the reply's text not sent yet, may go out as content now,
        whether calls have begun); started: some text went out already. What could begin an opening
        tag waits for the next piece, so a tag never straddles what went out and what did not."""
        at = unsent.find(self.OPEN)
        if at >= 0:
            return at, True
        for n in range(min(len(self.OPEN) - 1, len(unsent)), 0, -1):
            if self.OPEN.startswith(unsent[-n:]):
                return len(unsent) - n, False
        return len(unsent), False


class _WholeReply:
    """A format whose calls are the whole reply: it streams as text unless it begins (after any
    whitespace) with one of OPENERS, or with what could still become one."""
    OPENERS: tuple[str, ...] = ()

    def split(self, unsent: str, started: bool) -> tuple[int, bool]:
        if started:
            return len(unsent), False
        head = unsent.lstrip()
        if any(head.startswith(o) for o in self.OPENERS):
            return 0, True
        if not head or any(o.startswith(head) for o in self.OPENERS):
            return 0, False
        return len(unsent), False


class Llama3Json(_WholeReply):
    TAG = "<|python_tag|>"
    OPENERS = (TAG, "{")

    def parse(self, text: str, names: tuple[str, ...]) -> tuple[str | None, list[tuple[str, str]]]:
        body = text.strip()
        body = body[len(self.TAG):].lstrip() if body.startswith(self.TAG) else body
        if not body.startswith("{"):
            return text, []
        calls, at, decoder = [], 0, json.JSONDecoder()
        while at < len(body):
            try:
                value, at = decoder.raw_decode(body, at)
            except (ValueError, RecursionError):
                return text, []
            call = _json_call(value, names, "parameters", "arguments")
            if call is None:
                return text, []
            calls.append(call)
            rest = body[at:].lstrip()
            rest = rest[1:].lstrip() if rest.startswith(";") else rest
            at = len(body) - len(rest)
        return None, calls


class Pythonic(_WholeReply):
    START, END = "<|python_start|>", "<|python_end|>"
    OPENERS = (START, "[")

    def parse(self, text: str, names: tuple[str, ...]) -> tuple[str | None, list[tuple[str, str]]]:
        body = text.strip()
        if body.startswith(self.START):
            body = body[len(self.START):].removesuffix(self.END).strip()
        if not (body.startswith("[") and body.endswith("]")):
            return text, []
        try:
            tree = ast.parse(body, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return text, []
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, []
        calls = []
        for call in tree.elts:
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in names
                    and not call.args and all(k.arg is not None for k in call.keywords)):
                return text, []
            try:
                arguments = _arguments({k.arg: ast.literal_eval(k.value) for k in call.keywords})
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                return text, []
            if arguments is None:
                return text, []
            calls.append((call.func.id, arguments))
        return None, calls


PARSERS = {"hermes": Hermes(), "llama3_json": Llama3Json(), "pythonic": Pythonic()}
