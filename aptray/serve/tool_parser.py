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

"mistral": Mistral and Ministral models. After any text, [TOOL_CALLS] (a special token: the app
keeps special tokens in the text of these requests, as vLLM does) and the calls: before the v11
tokenizers one JSON array, [{"name": "get_weather", "arguments": {"city": "Paris"}}]; from v11 one
tag per call, [TOOL_CALLS]get_weather{"city": "Paris"}, or get_weather[ARGS]{...}.

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


class _Tagged:
    """A format whose calls come after any text, each opened by the tag OPEN. split: text streams
    until the first tag."""
    OPEN = ""
    SHOWS_SPECIAL_TOKENS = False  # True: OPEN is a special token, which the text then keeps

    def split(self, unsent: str, started: bool, names: tuple[str, ...]) -> tuple[int, bool]:
        """Streaming: (how much of unsent, the reply's text not sent yet, may go out as content now,
        whether calls have begun); started: some text went out already; names: the request's tools.
        What could begin an opening tag waits for the next piece, so a tag never straddles what went
        out and what did not."""
        at = unsent.find(self.OPEN)
        if at >= 0:
            return at, True
        for n in range(min(len(self.OPEN) - 1, len(unsent)), 0, -1):
            if self.OPEN.startswith(unsent[-n:]):
                return len(unsent) - n, False
        return len(unsent), False

    @staticmethod
    def _content(text: str, at: int) -> str | None:
        """The text before the calls (at: the first tag), None where it is only whitespace."""
        return text[:at] if text[:at].strip() else None


class Hermes(_Tagged):
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
        return self._content(text, at), calls


class Mistral(_Tagged):
    OPEN = "[TOOL_CALLS]"
    SHOWS_SPECIAL_TOKENS = True
    # a call of the v11 tokenizers: its name, maybe an id, maybe [ARGS], then the arguments' JSON
    _NAMED = re.compile(r"\s*([A-Za-z0-9_-]{1,64})(?:\[CALL_ID\][A-Za-z0-9]{1,64})?(?:\[ARGS\])?\s*")

    def parse(self, text: str, names: tuple[str, ...]) -> tuple[str | None, list[tuple[str, str]]]:
        at = text.find(self.OPEN)
        if at < 0:
            return text, []
        calls = []
        for part in text[at + len(self.OPEN):].split(self.OPEN):
            found = self._array(part, names) if part.lstrip().startswith("[") else self._named(part, names)
            if not found:
                return text, []
            calls += found
        return self._content(text, at), calls

    @staticmethod
    def _array(part: str, names: tuple[str, ...]) -> list[tuple[str, str]] | None:
        """Before the v11 tokenizers: [{"name": ..., "arguments": {...}}, ...]."""
        value = json_value(part)
        calls = [_json_call(v, names, "arguments") for v in value] if isinstance(value, list) else []
        return calls if calls and None not in calls else None

    def _named(self, part: str, names: tuple[str, ...]) -> list[tuple[str, str]] | None:
        """From the v11 tokenizers: name{...} or name[ARGS]{...}, one call after each tag."""
        head = self._NAMED.match(part)
        if head is None or head.group(1) not in names:
            return None
        arguments = _arguments(json_value(part[head.end():]))
        return None if arguments is None else [(head.group(1), arguments)]


class _WholeReply:
    """A format whose calls are the whole reply: it streams as text unless it begins (after any
    whitespace) with one of OPENERS, or with what could still become one. A reply that begins so is
    held until it is surely calls (then to its end, parsed whole) or surely not (then it goes out as
    text): _shape() reads its head."""
    OPENERS: tuple[str, ...] = ()
    SHOWS_SPECIAL_TOKENS = False
    HEAD_CHARS = 512  # a head still undecided after this many characters is held as calls

    def split(self, unsent: str, started: bool, names: tuple[str, ...]) -> tuple[int, bool]:
        if started:
            return len(unsent), False
        head = unsent.lstrip()[:self.HEAD_CHARS + 1]
        if not head or any(o.startswith(head) for o in self.OPENERS):
            return 0, False
        if not any(head.startswith(o) for o in self.OPENERS):
            return len(unsent), False
        shape = self._shape(self._body(head), names)
        if shape is None and len(head) > self.HEAD_CHARS:
            shape = True
        if shape is None:
            return 0, False
        return (0, True) if shape else (len(unsent), False)

    def _body(self, head: str) -> str:
        """head without the special token that may open it."""
        tag = self.OPENERS[0]
        return head[len(tag):].lstrip() if head.startswith(tag) else head

    def _shape(self, body: str, names: tuple[str, ...]) -> bool | None:
        """True: body begins a call of one of names; False: it cannot be calls; None: not known yet."""
        raise NotImplementedError


def _prefix_of_a_name(text: str, names: tuple[str, ...]) -> bool:
    return any(n.startswith(text) for n in names)


class Llama3Json(_WholeReply):
    TAG = "<|python_tag|>"
    OPENERS = (TAG, "{")
    KEYS = ("name", "parameters", "arguments")
    # the head of {"name": "..." as far as it goes; no backslash (an escaped key or name is left undecided)
    _FIRST_KEY = re.compile(r'\{\s*(?:"([^"\\]*)(")?)?(.)?', re.S)
    _NAME = re.compile(r'\{\s*"name"\s*(?::\s*(?:"([^"\\]*)(")?)?)?(.)?', re.S)

    def _shape(self, body: str, names: tuple[str, ...]) -> bool | None:
        if not body.startswith("{"):
            return False if body else None  # the tag alone so far, or the tag and then text
        key, closed, after = self._FIRST_KEY.match(body).groups()
        if key is None:
            return None if after is None else False  # {} or {1: an object that names no tool
        if not closed:
            return False if after is None and not any(k.startswith(key) for k in self.KEYS) else None
        if key != "name":
            return None if key in self.KEYS else False  # the arguments first: the name comes later
        name, closed, after = self._NAME.match(body).groups()
        if name is None:
            return False if after is not None and after != "\\" else None
        if not closed:
            return None if after == "\\" or _prefix_of_a_name(name, names) else False
        return name in names

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
    _FIRST_CALL = re.compile(r"\[\s*(\w*)(\s*)(.)?", re.S)

    def _shape(self, body: str, names: tuple[str, ...]) -> bool | None:
        if not body.startswith("["):
            return False if body else None
        name, space, after = self._FIRST_CALL.match(body).groups()
        if after is None:  # the name may go on, or the list may have just begun
            return None if not name or not space and _prefix_of_a_name(name, names) or name in names else False
        return name in names and after == "("

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


PARSERS = {"hermes": Hermes(), "llama3_json": Llama3Json(), "mistral": Mistral(), "pythonic": Pythonic()}
