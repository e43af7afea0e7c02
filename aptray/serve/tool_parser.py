"""Tool calls written in a model's own format, for tool_choice "auto", where the model chooses
between text and calls (build_app's tool_call_parser names the format its chat template teaches).

"hermes": the format of Hermes 2 and 3 and of Qwen2.5's and Qwen3's chat templates. After any text
come one block or more of

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the last may lack its closing tag where the output ends). A reply is calls only where every block
is a JSON object naming one of the request's tools with its arguments as an object; any other reply
is text as the model wrote it, so that a client never receives a call the model did not make.
"""
from __future__ import annotations

import json
import re

PARSERS = ("hermes",)
OPEN = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def parse(text: str, names: tuple[str, ...]) -> tuple[str | None, list[tuple[str, str]]]:
    """(the text before the calls, None where there is none; [(name, arguments as JSON text)]) of a
    reply in the hermes format; (text, []) where it makes no call."""
    at = text.find(OPEN)
    if at < 0:
        return text, []
    calls = []
    for body in _BLOCK.findall(text, at):
        value = json_value(body)
        if not isinstance(value, dict) or value.get("name") not in names:
            return text, []
        arguments = value.get("arguments", {})
        if not isinstance(arguments, dict):
            return text, []
        calls.append((value["name"], json.dumps(arguments, ensure_ascii=False)))
    return (text[:at] if text[:at].strip() else None), calls


def json_value(text: str):
    """The JSON value text holds; None where it holds none (not JSON, or nested past Python's
    recursion limit, which raises RecursionError rather than ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def held_back(text: str) -> int:
    """How many characters at the end of streamed text could begin a call's opening tag: they wait
    for the next piece before they go out as text."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
