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
from aptray.serve.tools import MAX_TOOLS, ToolCallEvents, ToolReply, chat_sampling, plan
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
              for t, s in [(0.0, 0)] + [(1.0, seed) for seed in range(1, 11)]]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_output=StructuredOutput(**held_named))
               for s in range(3)]
    outs = llm.generate(["call a tool:"] * len(params), params)
    ended = [(sp, out) for sp, out in zip(params, outs) if out.outputs[0].finish_reason == "stop"]
    assert len(ended) >= 6, [o.outputs[0].text for o in outs]
    assert all(out.outputs[0].finish_reason == "stop" for out in outs[11:])  # one call of add: short
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
    assert _plan([ADD], "auto", parser="hermes") == (ToolReply("auto", names=("add",), parser="hermes"), None)
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


LLAMA_CALL = '{"name": "add", "parameters": {"a": 2, "b": 3}}'


@pytest.mark.parametrize("text,calls", [
    ("just text", None),
    (LLAMA_CALL, [("add", {"a": 2, "b": 3})]),
    ("  <|python_tag|>" + LLAMA_CALL + "\n", [("add", {"a": 2, "b": 3})]),
    (LLAMA_CALL + '; {"name": "now", "parameters": {}}', [("add", {"a": 2, "b": 3}), ("now", {})]),
    (LLAMA_CALL + ' {"name": "now"}', [("add", {"a": 2, "b": 3}), ("now", {})]),
    ('{"name": "add", "arguments": {"a": 1, "b": 1}}', [("add", {"a": 1, "b": 1})]),
    ("Sure: " + LLAMA_CALL, None),  # the calls are the whole reply
    ('{"name": "rm", "parameters": {}}', None),
    ('{"name": "add", "parameters": [2, 3]}', None),
    ('{"name": "add", "parameters": {"a": NaN}}', None),  # Python's json reads NaN: not JSON
    (LLAMA_CALL + "; oops", None),
    ('{"name": "add", "parameters": {"a": 2', None),
    ("{" * 1200, None),
])
def test_llama3_json_replies_are_text_or_calls(text, calls):
    got_content, got = _plan([WEATHER, ADD, NOW], "auto", parser="llama3_json")[0].parse(text)
    assert got_content == (text if calls is None else None)
    assert (None if got is None else [(c.function.name, json.loads(c.function.arguments)) for c in got]) == calls


@pytest.mark.parametrize("text,calls", [
    ("just text", None),
    ("[add(a=2, b=3)]", [("add", {"a": 2, "b": 3})]),
    ('[get_weather(city="Paris"), now()]', [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("<|python_start|>[now()]<|python_end|>", [("now", {})]),
    ("[add(a=True, b=None)]", [("add", {"a": True, "b": None})]),
    ("[add(a=(1, 2), b={'k': [1.5]})]", [("add", {"a": [1, 2], "b": {"k": [1.5]}})]),
    ("[add(2, 3)]", None),  # positional arguments
    ("[rm()]", None),
    ("[os.system(a=1)]", None),
    ("[add(**kw)]", None),
    ("[add(a=x)]", None),  # a name, not a literal
    ("[add(a={1, 2})]", None),  # a set: no JSON
    ("[add(a=1e999)]", None),  # infinity: no JSON
    ("[add(a=1)] and text", None),
    ("[1, 2]", None),
    ("[]", None),
    ("[" * 1200 + "]" * 1200, None),
])
def test_pythonic_replies_are_text_or_calls(text, calls):
    got_content, got = _plan([WEATHER, ADD, NOW], "auto", parser="pythonic")[0].parse(text)
    assert got_content == (text if calls is None else None)
    assert (None if got is None else [(c.function.name, json.loads(c.function.arguments)) for c in got]) == calls


@pytest.mark.parametrize("parser,pieces,content,calls", [
    ("llama3_json", [" ", '{"name": "add", ', '"parameters": {"a": 1, "b": 1}}'], [], [("add", {"a": 1, "b": 1})]),
    ("llama3_json", ["<|pyth", 'on_tag|>{"name": "now"}'], [], [("now", {})]),
    ("llama3_json", ["<|py", "thon is", " nice"], ["<|python is", " nice"], None),
    ("llama3_json", ["Hello", " {", "}"], ["Hello", " {", "}"], None),
    ("pythonic", ["[add(a=1,", " b=1)]"], [], [("add", {"a": 1, "b": 1})]),
    ("pythonic", ["[citation", " needed] yes"], ["[citation", " needed] yes"], None),  # no tool's name: text
    ("pythonic", ["No", " [calls]"], ["No", " [calls]"], None),
    # held only while the head could still be a call of one of the tools, then it goes out whole
    ("llama3_json", ['{"answer"', ": 42}"], ['{"answer"', ": 42}"], None),
    ("llama3_json", ['{"name": "ad', 'x", "parameters": {}}'], ['{"name": "adx", "parameters": {}}'], None),
    ("llama3_json", ["{", "}"], ["{}"], None),
    ("llama3_json", ['{"parameters": {"a": 1, "b": 1}, ', '"name": "add"}'], [], [("add", {"a": 1, "b": 1})]),
    ("llama3_json", ["<|python_tag|>", "print(1)"], ["<|python_tag|>print(1)"], None),
    ("pythonic", ["[ad", "d (a=1, b=1)]"], [], [("add", {"a": 1, "b": 1})]),
    ("pythonic", ["[1, 2]"], ["[1, 2]"], None),
    ("pythonic", ["[now", "_please()]"], ["[now_please()]"], None),
])
def test_streamed_whole_reply_formats_hold_what_could_be_calls(parser, pieces, content, calls):
    """A format whose calls are the whole reply streams text at once unless the reply begins with
    what is or could become a call; that waits for the end, then goes out as calls or as text."""
    events = ToolCallEvents(_plan([ADD, NOW], "auto", parser=parser)[0], "chatcmpl-x", "m", False)
    out = _events("".join(events.render([_chunk(p)]) for p in pieces) + events.render([_chunk("", True, "stop")]))
    deltas = [e["choices"][0]["delta"] for e in out]
    assert [d["content"] for d in deltas if d.get("content")] == content
    got = [c for d in deltas for c in d.get("tool_calls") or []]
    assert ([(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] or None) == calls
    assert out[-1]["choices"][0]["finish_reason"] == ("tool_calls" if calls else "stop")


@pytest.mark.parametrize("text,content,calls", [
    ("just text [1, 2]", "just text [1, 2]", None),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}}]', None, [("add", {"a": 2, "b": 3})]),
    ('Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "now", "arguments": {}}]',
     "Sure. ", [("add", {"a": 1, "b": 1}), ("now", {})]),
    ('[TOOL_CALLS]add{"a": 2, "b": 3}[TOOL_CALLS]now{}', None, [("add", {"a": 2, "b": 3}), ("now", {})]),
    ('[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}', None, [("add", {"a": 2, "b": 3})]),
    ('[TOOL_CALLS]add[CALL_ID]a1B2c3D4e[ARGS]{"a": 2, "b": 3}', None, [("add", {"a": 2, "b": 3})]),
    ('[TOOL_CALLS]rm{"path": "/"}', '[TOOL_CALLS]rm{"path": "/"}', None),  # not a tool of the request
    ('[TOOL_CALLS]add{"a": 2', '[TOOL_CALLS]add{"a": 2', None),  # cut short
    ('[TOOL_CALLS]add{"a": 2} and more', '[TOOL_CALLS]add{"a": 2} and more', None),
    ('[TOOL_CALLS]add[1, 2]', '[TOOL_CALLS]add[1, 2]', None),  # arguments not an object
    ('[TOOL_CALLS][]', "[TOOL_CALLS][]", None),
    ("[TOOL_CALLS]" + "[" * 1200, "[TOOL_CALLS]" + "[" * 1200, None),
])
def test_mistral_replies_are_text_or_calls(text, content, calls):
    got_content, got = _plan([ADD, NOW], "auto", parser="mistral")[0].parse(text)
    assert got_content == content
    assert (None if got is None else [(c.function.name, json.loads(c.function.arguments)) for c in got]) == calls


def test_mistral_replies_keep_special_tokens_and_stream_until_the_tag():
    """Its calls open with a special token, so the app keeps special tokens in the text of an auto
    reply (not of others); streamed, text goes out until the tag, which may come in pieces."""
    assert chat_sampling(_request([ADD], "auto"), "mistral")[1]["skip_special_tokens"] is False
    assert chat_sampling(_request([ADD], "auto"), "hermes")[1]["skip_special_tokens"] is True
    assert chat_sampling(_request([ADD], "required"), "mistral")[1]["skip_special_tokens"] is True
    assert chat_sampling(_request([], None), "mistral")[1]["skip_special_tokens"] is True
    events = ToolCallEvents(_plan([ADD], "auto", parser="mistral")[0], "chatcmpl-x", "m", False)
    pieces = ["Adding", " [TOOL", "_CALLS]add", '{"a": 1, "b": 1}']
    out = _events("".join(events.render([_chunk(p)]) for p in pieces) + events.render([_chunk("", True, "stop")]))
    deltas = [e["choices"][0]["delta"] for e in out]
    assert [d.get("content") for d in deltas if d.get("content")] == ["Adding", " "]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in deltas[-1]["tool_calls"]] == [
        ("add", {"a": 1, "b": 1})]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_template_options_that_would_set_what_the_server_sets_are_refused():
    from aptray.serve.tools import template_kwargs
    assert template_kwargs({"enable_thinking": False}) == {"enable_thinking": False} and template_kwargs(None) == {}
    for taken in ("chat_template", "tokenize", "messages", "tools", "add_generation_prompt"):
        with pytest.raises(InvalidRequest, match=f"cannot set '{taken}'") as e:
            template_kwargs({taken: "{{ 1 }}", "enable_thinking": True})
        assert e.value.param == "chat_template_kwargs"
    both = ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")], continue_final_message=True)
    with pytest.raises(InvalidRequest, match="set add_generation_prompt to false") as e:
        chat_sampling(both, None)
    assert e.value.param == "continue_final_message"


def test_parallel_tool_calls_false_is_one_call():
    """auto: the model's first call; required: the structure allows one call only."""
    two = HERMES_CALL + HERMES_CALL.replace("add", "now").replace('{"a": 2, "b": 3}', "{}")
    single = plan(_request([ADD, NOW]).tools, "auto", "hermes", parallel=False)[0]
    assert [c.function.name for c in single.parse(two)[1]] == ["add"]
    assert [c.function.name for c in _plan([ADD, NOW], "auto", parser="hermes")[0].parse(two)[1]] == ["add", "now"]
    held = plan(_request([ADD, NOW]).tools, "required", None, parallel=False)[1]
    schema = json.loads(held["spec"])
    jsonschema.validate([{"name": "now", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "parameters": {}}] * 2, schema)
    assert "maxItems" not in json.loads(_plan([ADD, NOW], "required")[1]["spec"])


def test_the_apps_parser_is_one_it_knows():
    from aptray.serve.args import AppArgs
    assert AppArgs.parse({"tool_call_parser": "hermes"}).tool_call_parser == "hermes"
    assert AppArgs.parse({"tool_call_parser": "pythonic"}).tool_call_parser == "pythonic"
    assert AppArgs.parse({"tool_call_parser": "none"}).tool_call_parser is None
    assert AppArgs.parse({"tool_call_parser": "mistral"}).tool_call_parser == "mistral"
    with pytest.raises(ValueError, match="tool_call_parser 'granite': use one of"):
        AppArgs.parse({"tool_call_parser": "granite"})


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
    writes both out, through the chat_prompt that chat requests and /tokenize use."""
    from transformers import AutoTokenizer

    from aptray.serve.tools import chat_chars, chat_prompt, tool_specs

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
    text, ids = chat_prompt(tok, req, tool_specs(req.tools))
    assert text == "[tool add]<user>add<assistant>{call add a=2}<tool>5" and ids
    deep = []
    for _ in range(1200):  # deeper than json.dumps can write
        deep = [deep]
    nested = ChatMessage.model_construct(role="assistant", content=None, tool_calls=[{"x": deep}])
    with pytest.raises(InvalidRequest, match="nest too deep"):
        chat_chars([nested], None)


def test_offline_chat_takes_tools_and_vllms_template_arguments():
    """LLM.chat passes chat_template, tools, add_generation_prompt, continue_final_message and
    chat_template_kwargs to the template: its tokens are generate()'s on the text they render."""
    llm = LLM(tiny_model("opt-60x3"), num_cache_blocks=32)
    template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{{ greeting | default('') }}{% endif %}")
    sp = SamplingParams(temperature=0.0, max_tokens=6)

    def tokens_of(text):
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        return llm.generate({"prompt_token_ids": ids}, sp)[0].outputs[0].token_ids

    asked = [{"role": "user", "content": "add"}]
    out = llm.chat(asked, sp, chat_template=template, tools=[ADD], chat_template_kwargs={"greeting": "hi"})
    assert out[0].outputs[0].token_ids == tokens_of("[tool add]<user>add<assistant>hi")
    started = asked + [{"role": "assistant", "content": "The sum is"}]
    out = llm.chat(started, sp, chat_template=template, add_generation_prompt=False, continue_final_message=True)
    assert out[0].outputs[0].token_ids == tokens_of("<user>add<assistant>The sum is")
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(started, sp, chat_template=template, continue_final_message=True)
