"""Tool calls (aptray.serve.tools): what tools and tool_choice ask is refused or held to the tools'
schemas; a held reply parses into calls that follow those schemas; streamed, a named call's
arguments come piece by piece and required calls whole at the end."""
from __future__ import annotations

import json

import jsonschema
import pytest

from aptray import LLM, SamplingParams
from aptray.sampling_params import InvalidRequest
from aptray.serve.openai_api import ChatCompletionRequest, ChatMessage
from aptray.serve.tools import MAX_TOOLS, ToolCallEvents, ToolReply, plan
from aptray.structured_output import StructuredOutput
from tiny_models import tiny_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "additionalProperties": False,
                                                           "properties": {"city": {"type": "string", "maxLength": 8}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "required": ["a", "b"], "additionalProperties": False,
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters


def _request(tools, tool_choice=None) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice=tool_choice)


def _plan(tools, tool_choice=None, parser=None):
    req = _request(tools, tool_choice)
    return plan(req.tools, req.tool_choice, parser)


@pytest.mark.parametrize("tools,choice,match,param", [
    ([WEATHER], None, "tool_choice auto needs a parser", "tool_choice"),
    ([WEATHER], "auto", "tool_choice auto needs a parser", "tool_choice"),
    (None, "required", "needs tools", "tool_choice"),
    ([], {"type": "function", "function": {"name": "add"}}, "needs tools", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "add"}}, "not among the tools", "tool_choice"),
    ([WEATHER, WEATHER], "required", "two tools are named", "tools"),
    ([{"type": "function", "function": {"name": "no spaces"}}], "required", "1-64 letters", "tools"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "required", "1-64 letters", "tools"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)], "required", "at most 128",
     "tools"),
])
def test_what_cannot_be_served_is_refused(tools, choice, match, param):
    with pytest.raises(InvalidRequest, match=match) as refused:
        _plan(tools, choice)
    assert refused.value.param == param


def test_none_and_no_tools_are_text():
    assert _plan(None) == (ToolReply(), None)
    assert _plan([WEATHER], "none") == (ToolReply(), None)
    assert _plan(None, "none") == (ToolReply(), None)


def test_auto_without_tools_is_text():
    assert _plan(None, "auto") == (ToolReply(), None)


def test_held_replies_are_calls_that_follow_the_tools_schemas():
    """The tiny model's replies, held to the structures plan() makes, parse into calls whose names
    are tools and whose arguments follow the tool's schema (a random model may go on adding calls
    to the array: those cut at max_tokens are left out)."""
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=8)
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in (WEATHER, ADD, NOW)}
    required, held = _plan([WEATHER, ADD, NOW], "required")
    named, held_named = _plan([WEATHER, ADD], {"type": "function", "function": {"name": "add"}})
    params = [SamplingParams(temperature=t, seed=s, max_tokens=200, structured_output=StructuredOutput(**held))
              for t, s in ((0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3), (1.0, 4), (1.0, 5))]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_output=StructuredOutput(**held_named))
               for s in range(3)]
    outs = llm.generate(["call a tool:"] * len(params), params)
    ended = [(sp, out) for sp, out in zip(params, outs) if out.outputs[0].finish_reason == "stop"]
    assert len(ended) >= 6, [o.outputs[0].text for o in outs]
    assert all(out.outputs[0].finish_reason == "stop" for out in outs[6:])  # one call of add: short
    for sp, out in ended:
        completion = out.outputs[0]
        reply = required if sp.structured_output.spec == held["spec"] else named
        content, calls = reply.parse(completion.text)
        assert calls and content is None, completion.text
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            schema = schemas[call.function.name] or {"type": "object", "additionalProperties": False}
            jsonschema.validate(json.loads(call.function.arguments), schema)
        if reply is named:
            assert [c.function.name for c in calls] == ["add"]
            assert calls[0].function.arguments == completion.text


def _chunk(text, finished=False, reason=None, ids=(1,)):
    chunk = {"request_id": "r", "token_ids": list(ids), "text": text, "finished": finished,
             "finish_reason": reason}
    if finished:
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": 5}
    return chunk


def _events(rendered: str) -> list[dict]:
    return [json.loads(line[6:]) for line in rendered.split("\n\n") if line.startswith("data: ")]


def test_streamed_named_call_opens_once_then_sends_its_arguments():
    events = ToolCallEvents(ToolReply("named", "add"), "chatcmpl-x", "m", True)
    out = _events(events.render([_chunk('{"a": '), _chunk("1, ")]) + events.render(
        [_chunk('"b": 2}'), _chunk("", True, "stop")]))
    deltas = [e["choices"][0]["delta"] for e in out if e["choices"]]
    first = deltas[0]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"] == {"name": "add", "arguments": '{"a": '}
    assert [d["tool_calls"][0] for d in deltas[1:3]] == [{"index": 0, "function": {"arguments": "1, "}},
                                                         {"index": 0, "function": {"arguments": '"b": 2}'}}]
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[:3]) == '{"a": 1, "b": 2}'
    assert [e["choices"][0]["finish_reason"] for e in out if e["choices"]][-1] == "tool_calls"
    assert out[-1]["usage"]["completion_tokens"] == 5  # include_usage


def test_streamed_required_calls_come_whole_at_the_end_and_cut_short_as_text():
    events = ToolCallEvents(ToolReply("required"), "chatcmpl-x", "m", False)
    text = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "now", "parameters": {}}]'
    out = _events(events.render([_chunk(text[:20])]) + events.render([_chunk(text[20:], True, "stop")]))
    assert all("tool_calls" not in e["choices"][0]["delta"] for e in out[:-1])
    last = out[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    calls = last["delta"]["tool_calls"]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "add", {"a": 1, "b": 2}), (1, "now", {})]
    cut = ToolCallEvents(ToolReply("required"), "chatcmpl-x", "m", False)
    out = _events(cut.render([_chunk(text[:20]), _chunk(text[20:30], True, "length")]))
    assert out[-1]["choices"][0]["finish_reason"] == "length"
    assert out[-1]["choices"][0]["delta"]["content"] == text[:30]


HERMES_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.mark.parametrize("text,content,calls", [
    ("just text", "just text", None),
    (HERMES_CALL, None, [("add", {"a": 2, "b": 3})]),
    ("Let me add.\n" + HERMES_CALL + "\n" + HERMES_CALL.replace("add", "now").replace('{"a": 2, "b": 3}', "{}"),
     "Let me add.\n", [("add", {"a": 2, "b": 3}), ("now", {})]),
    ('<tool_call>{"name": "now"}', None, [("now", {})]),  # the output ended before the closing tag
    ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
     None),  # not a tool: text
    ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', '<tool_call>{"name": "add", "arguments": [1]}'
     '</tool_call>', None),
    ("<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", None),
    ("text " + HERMES_CALL + "<tool_call>oops", "text " + HERMES_CALL + "<tool_call>oops", None),  # one bad: none
])
def test_hermes_replies_are_text_and_calls(text, content, calls):
    reply = _plan([WEATHER, ADD, NOW], "auto", parser="hermes")[0]
    got_content, got = reply.parse(text)
    assert got_content == content
    assert (None if got is None else [(c.function.name, json.loads(c.function.arguments)) for c in got]) == calls


def test_auto_needs_the_apps_parser():
    assert _plan([ADD], "auto", parser="hermes") == (ToolReply("auto", names=("add",)), None)
    assert _plan([ADD], None, parser="hermes")[0].mode == "auto"  # OpenAI's default with tools


def test_streamed_auto_sends_text_then_calls_whole():
    """Text goes out as it comes, but for what could begin the opening tag; the calls come whole at
    the end. A reply without calls sends what it held back as text."""
    events = ToolCallEvents(_plan([ADD], "auto", parser="hermes")[0], "chatcmpl-x", "m", False)
    pieces = ["Sure", ". <tool", "_call>\n{\"name\": \"add\", ", '"arguments": {"a": 1, "b": 1}}\n</tool_call>']
    out = _events("".join(events.render([_chunk(p)]) for p in pieces) + events.render([_chunk("", True, "stop")]))
    deltas = [e["choices"][0]["delta"] for e in out]
    assert [d.get("content") for d in deltas if d.get("content")] == ["Sure", ". "]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"
    calls = deltas[-1]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 1})]
    plain = ToolCallEvents(_plan([ADD], "auto", parser="hermes")[0], "chatcmpl-x", "m", False)
    out = _events(plain.render([_chunk("a <to")]) + plain.render([_chunk("y", True, "stop")]))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in out) == "a <toy"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_apps_parser_is_one_it_knows():
    from aptray.serve.args import AppArgs
    assert AppArgs.parse({"tool_call_parser": "hermes"}).tool_call_parser == "hermes"
    assert AppArgs.parse({"tool_call_parser": "none"}).tool_call_parser is None
    with pytest.raises(ValueError, match="tool_call_parser 'mistral': use one of"):
        AppArgs.parse({"tool_call_parser": "mistral"})


def test_replies_nested_past_pythons_limit_are_text():
    """JSON nested past Python's recursion limit raises RecursionError, not ValueError: such a reply
    (a client's regex or choice can make it) is text, never a 500."""
    deep = "[" * 1200
    assert _plan([ADD], "auto", parser="hermes")[0].parse("<tool_call>" + deep) == ("<tool_call>" + deep, None)
    assert ToolReply("named", "add").parse(deep) == (deep, None)
    assert ToolReply("required").parse(deep) == (deep, None)


def test_the_template_gets_tools_and_calls_as_objects():
    """tools reach the chat template, and an assistant's tool call's arguments arrive as an object
    (the API's JSON text, parsed), as transformers' templates expect: checked with a template that
    writes both out, through the ingress's own _chat_prompt."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from aptray.serve.ingress import Ingress
    from aptray.serve.tools import chat_chars

    tok = AutoTokenizer.from_pretrained(tiny_model("opt-60x3"))
    tok.chat_template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
                         "{% for c in m.tool_calls or [] %}{call {{ c.function.name }} a={{ c.function.arguments.a }}}"
                         "{% endfor %}{% endfor %}")
    req = ChatCompletionRequest(messages=[
        {"role": "user", "content": "add"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}], tools=[ADD], tool_choice="none")
    text, ids = Ingress.func_or_class._chat_prompt(SimpleNamespace(tokenizer=tok), req,
                                                   [t.model_dump(exclude_none=True) for t in req.tools])
    assert text == "[tool add]<user>add<assistant>{call add a=2}<tool>5" and ids
    deep = []
    for _ in range(1200):  # deeper than json.dumps can write
        deep = [deep]
    nested = ChatMessage.model_construct(role="assistant", content=None, tool_calls=[{"x": deep}])
    with pytest.raises(InvalidRequest, match="nest too deep"):
        chat_chars([nested], None)
