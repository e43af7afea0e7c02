"""Hostile input against the served app: property-based fuzzing of the HTTP API (request bodies
drawn from its own OpenAPI schema, then mutated) and of the gRPC API, plus hand-picked attacks
(oversized, invalid UTF-8, deep nesting, huge and negative numbers, unknown models, clients that
disconnect mid-stream).

Every answer must be a 2xx, or a 4xx carrying a JSON error; never a 5xx, a crash or a hang
(every call has a timeout). Bounded: APTRAY_FUZZ_EXAMPLES examples per property (default 60).
"""
import json
import os
import pathlib
import re
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from aptray.model.demo import demo_model_dir, ensure_demo_model  # noqa: E402
from fault_tools import metric, sse_events  # noqa: E402
from serve_tools import served_app  # noqa: E402

EXAMPLES = int(os.environ.get("APTRAY_FUZZ_EXAMPLES", "60"))
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 << 10
BODY_TIMEOUT_S = 3.0
TIMEOUT = 60  # seconds: a hang fails the test instead of blocking it
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
STATS = {"http": 0, "grpc": 0, "codes": {}}


@pytest.fixture(scope="module")
def server():
    ensure_demo_model(demo_model_dir())
    args = {"tensor_parallel_size": 1, "num_cache_blocks": 64, "max_num_seqs": 8, "max_queue": 64,
            "use_gpu": False, "api_keys": KEY, "max_body_bytes": MAX_BODY, "max_tokens_limit": 4,
            "body_timeout_s": BODY_TIMEOUT_S}
    with served_app(args, num_cpus=3) as addresses:
        yield {**addresses, "schema": httpx.get(addresses["http"] + "/openapi.json", headers=AUTH,
                                                timeout=TIMEOUT).json()}
        print(f"RELIABILITY fuzz http_inputs={STATS['http']} grpc_inputs={STATS['grpc']} codes={STATS['codes']}")


# -- strategies from the OpenAPI schema --------------------------------------------------------
LONE_SURROGATES = st.sampled_from(["\ud800", "hi \udfff", "\udc00\ud800"])  # hypothesis's text() draws none
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e308, -1e308, 2**63, -(2**63) - 1]),
    st.text(max_size=40), st.sampled_from(["\x00", "\ud7ff\ue000", "💥" * 50, "a" * 5000, "</s>", "{{x}}", "\ud800"]),
    st.lists(st.integers(min_value=-5, max_value=60000), max_size=8), st.dictionaries(st.text(max_size=5), st.integers()))


def from_schema(schema: dict, defs: dict, depth: int = 0):
    """Values that follow the schema (types, bounds, required keys), loosely: then mutated by HOSTILE."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].split("/")[-1]], defs, depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, depth) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    t = schema.get("type")
    if t == "string":
        return st.one_of(st.text(max_size=30), LONE_SURROGATES)
    if t == "integer":
        lo, hi = schema.get("minimum", schema.get("exclusiveMinimum", -10)), schema.get("maximum", 6)
        return st.integers(min_value=int(lo), max_value=max(int(lo), int(hi)))
    if t == "number":
        return st.floats(min_value=schema.get("minimum", -2.0), max_value=schema.get("maximum", 3.0),
                         allow_nan=False)
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        return st.lists(from_schema(schema.get("items", {}), defs, depth + 1), max_size=4 if depth < 2 else 1)
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {k: from_schema(v, defs, depth + 1) for k, v in props.items()}
        return st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})
    return HOSTILE


def bodies(schema_doc: dict, name: str):
    defs = schema_doc["components"]["schemas"]
    base = from_schema(defs[name], defs)

    @st.composite
    def mutated(draw):
        body = draw(base)
        if draw(st.booleans()):  # break one field: wrong type, out of range, absurd size
            keys = sorted(set(body) | {"max_tokens", "n", "model", "seed", "top_k", "temperature", "stop", "prompt",
                                       "min_p", "min_tokens", "logit_bias", "logprobs", "top_logprobs",
                                       "presence_penalty", "frequency_penalty"})
            body[draw(st.sampled_from(keys))] = draw(HOSTILE)
        limit = "max_output_tokens" if name == "ResponsesRequest" else "max_tokens"
        body.setdefault(limit, draw(st.integers(min_value=1, max_value=4)))  # keep generations short
        return body
    return mutated()


def _check_http(r) -> None:
    code = r.status_code
    STATS["codes"][code] = STATS["codes"].get(code, 0) + 1
    assert code < 500, (code, r.text[:500])
    if code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["code"] == code
    elif "text/event-stream" in r.headers.get("content-type", "") and str(r.url).endswith("/v1/responses"):
        events = sse_events(r.text.splitlines())  # the Responses API's: no [DONE], the response last
        assert events and events[-1]["type"] in ("response.completed", "response.incomplete", "error")
        assert not any(e["type"] == "error" and int(e["code"]) >= 500 for e in events)
    elif "text/event-stream" in r.headers.get("content-type", ""):
        events = sse_events(r.text.splitlines())
        assert not any("error" in e and e["error"]["code"] >= 500 for e in events)
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        answer, path = r.json(), r.url.path
        assert (answer["choices"] if path.startswith("/v1/c") else answer["output"] if path == "/v1/responses"
                else "tokens" in answer or "prompt" in answer)


@pytest.mark.parametrize("path,name", [("/v1/completions", "CompletionRequest"),
                                       ("/v1/chat/completions", "ChatCompletionRequest"),
                                       ("/tokenize", "TokenizeCompletionRequest"), ("/tokenize", "TokenizeChatRequest"),
                                       ("/detokenize", "DetokenizeRequest"), ("/v1/responses", "ResponsesRequest")])
def test_http_schema_fuzz(server, path, name):
    client = httpx.Client(timeout=TIMEOUT)

    @FUZZ
    @given(body=bodies(server["schema"], name))
    def run(body):
        STATS["http"] += 1
        # ensure_ascii: JSON escapes, so that lone surrogates travel (a client's UTF-8 encoder refuses them)
        _check_http(client.post(server["http"] + path, content=json.dumps(body, ensure_ascii=True),
                                headers={**AUTH, "content-type": "application/json"}))
    run()
    client.close()


# -- hand-picked attacks -----------------------------------------------------------------------
RAW = [
    ("invalid utf-8", b'{"prompt": "\xff\xfe\xfa", "max_tokens": 2}', 400),
    ("not json", b"{not json", 422),
    ("empty body", b"", 422),
    ("json array", b"[1, 2, 3]", 422),
    ("deep nesting", b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", None),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', 422),
    ("huge max_tokens", b'{"prompt": "hi", "max_tokens": 100000000000000000000000000}', 400),
    ("negative max_tokens", b'{"prompt": "hi", "max_tokens": -5}', 422),
    ("huge seed", b'{"prompt": "hi", "max_tokens": 2, "seed": 18446744073709551617}', 400),
    ("huge top_k", b'{"prompt": "hi", "max_tokens": 2, "top_k": 99999999999}', 400),
    ("token id out of vocab", b'{"prompt": [1, 2, 999999999], "max_tokens": 2}', 400),
    ("negative token id", b'{"prompt": [-1], "max_tokens": 2}', 400),
    ("unknown model", b'{"prompt": "hi", "model": "gpt-9", "max_tokens": 2}', 404),
    ("n = 17", b'{"prompt": "hi", "n": 17, "max_tokens": 2}', 400),
    ("n = 0", b'{"prompt": "hi", "n": 0, "max_tokens": 2}', 400),
    ("n = 2", b'{"prompt": "hi", "n": 2, "max_tokens": 2}', 200),
    ("long prompt", json.dumps({"prompt": "hello " * 5000, "max_tokens": 2}).encode(), 400),
    ("too many stops", json.dumps({"prompt": "hi", "max_tokens": 2, "stop": ["x"] * 50}).encode(), 400),
    ("logit_bias out of vocab", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"99999999999999999999": 5}}', 400),
    ("logit_bias negative id", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"-1": 5}}', 400),
    ("logit_bias not an id", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"\\u00b2": 5}}', 400),
    ("logit_bias over 100", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": 1e308}}', 400),
    ("logit_bias NaN", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": NaN}}', 422),
    ("logit_bias denormal", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": -5e-324}}', 200),
    ("logit_bias over 300 tokens", json.dumps({"prompt": "hi", "max_tokens": 2,
                                              "logit_bias": {str(i): -100 for i in range(301)}}).encode(), 400),
    ("min_tokens over max_tokens", b'{"prompt": "hi", "max_tokens": 2, "min_tokens": 3}', 400),
    ("min_p over 1", b'{"prompt": "hi", "max_tokens": 2, "min_p": 1.5}', 422),
    ("denormal min_p", b'{"prompt": "hi", "max_tokens": 2, "min_p": 5e-324, "temperature": 1}', 200),
    ("presence_penalty over 2", b'{"prompt": "hi", "max_tokens": 2, "presence_penalty": 2.5}', 422),
    ("frequency_penalty -1e308", b'{"prompt": "hi", "max_tokens": 2, "frequency_penalty": -1e308}', 422),
    ("denormal penalties", b'{"prompt": "hi", "max_tokens": 2, "presence_penalty": 5e-324, '
                           b'"frequency_penalty": -5e-324}', 200),
    ("penalties at the bounds", b'{"prompt": "hi", "max_tokens": 3, "presence_penalty": -2, '
                                b'"frequency_penalty": 2}', 200),
    ("repetition_penalty 0", b'{"prompt": "hi", "max_tokens": 2, "repetition_penalty": 0}', 422),
    ("repetition_penalty negative", b'{"prompt": "hi", "max_tokens": 2, "repetition_penalty": -1.5}', 422),
    ("repetition_penalty over 2", b'{"prompt": "hi", "max_tokens": 2, "repetition_penalty": 2.5}', 422),
    ("repetition_penalty denormal", b'{"prompt": "hi", "max_tokens": 2, "repetition_penalty": 5e-324}', 422),
    ("repetition_penalty 0.01", b'{"prompt": "hi hi", "max_tokens": 3, "repetition_penalty": 0.01}', 200),
    ("repetition_penalty at 2", b'{"prompt": "hi hi hi", "max_tokens": 3, "repetition_penalty": 2}', 200),
    ("logprobs over 20", b'{"prompt": "hi", "max_tokens": 2, "logprobs": 21}', 422),
    ("logprobs negative", b'{"prompt": "hi", "max_tokens": 2, "logprobs": -1}', 422),
    ("logprobs huge", b'{"prompt": "hi", "max_tokens": 2, "logprobs": 1e308}', 422),
    ("logprobs fraction", b'{"prompt": "hi", "max_tokens": 2, "logprobs": 2.5}', 422),
    ("logprobs 20", b'{"prompt": "hi", "max_tokens": 2, "logprobs": 20}', 200),
    ("logprobs 20 with echo", b'{"prompt": "hi there", "max_tokens": 1, "logprobs": 20, "echo": true}', 200),
    ("oversized body", json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode(), 413),
    # each field in its JSON type, as OpenAI's API takes it
    ("boolean temperature", b'{"prompt": "hi", "max_tokens": 2, "temperature": true}', 422),
    ("string temperature", b'{"prompt": "hi", "max_tokens": 2, "temperature": "0.5"}', 422),
    ("integer temperature", b'{"prompt": "hi", "max_tokens": 2, "temperature": 0}', 200),
    ("fractional-typed max_tokens", b'{"prompt": "hi", "max_tokens": 2.0}', 422),
    ("string max_tokens", b'{"prompt": "hi", "max_tokens": "2"}', 422),
    ("boolean n", b'{"prompt": "hi", "max_tokens": 2, "n": true}', 422),
    ("string stream", b'{"prompt": "hi", "max_tokens": 2, "stream": "false"}', 422),
    ("integer ignore_eos", b'{"prompt": "hi", "max_tokens": 2, "ignore_eos": 1}', 422),
    ("boolean logprobs", b'{"prompt": "hi", "max_tokens": 2, "logprobs": true}', 422),
    ("boolean logit_bias", b'{"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": true}}', 422),
    ("boolean token id", b'{"prompt": [1, true], "max_tokens": 2}', 422),
    ("boolean SLO", b'{"prompt": "hi", "max_tokens": 2, "aptray_slo": {"ttft_ms": true}}', 422),
    ("string include_usage", b'{"prompt": "hi", "max_tokens": 2, "stream": true, '
                             b'"stream_options": {"include_usage": "yes"}}', 422),
]
TOKENIZE_RAW = [  # vLLM's /tokenize and /detokenize: the same limits as a request's prompt
    ("/tokenize", "513 messages", json.dumps({"messages": [{"role": "user", "content": "hi"}] * 513}).encode(), 400),
    ("/tokenize", "unknown model", b'{"prompt": "hi", "model": "gpt-9"}', 404),
    ("/tokenize", "continue and open a message", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                 b'"continue_final_message": true}', 400),
    ("/tokenize", "template kwargs that set the conversation", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                              b'"chat_template_kwargs": {"messages": []}}', 400),
    ("/tokenize", "no prompt, no messages", b'{"model": "x"}', 422),
    ("/detokenize", "token id out of vocab", b'{"tokens": [1, 2, 999999999]}', 400),
    ("/detokenize", "token id past int64", b'{"tokens": [100000000000000000000000000]}', 400),
    ("/detokenize", "negative token id", b'{"tokens": [-1]}', 400),
    ("/detokenize", "fractional token id", b'{"tokens": [2.5]}', 422),
    ("/detokenize", "more tokens than a context", json.dumps({"tokens": [5] * 5000}).encode(), 400),
    ("/detokenize", "no tokens", b'{"tokens": []}', 200),
    ("/detokenize", "boolean token id", b'{"tokens": [true]}', 422),
    ("/tokenize", "string add_special_tokens", b'{"prompt": "hi", "add_special_tokens": "no"}', 422),
]


def _structured(fmt: dict | None = None, **outputs) -> bytes:
    body = {"prompt": "hi", "max_tokens": 4}
    body |= {"response_format": fmt} if fmt else {"structured_outputs": outputs}
    return json.dumps(body).encode()


def _schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


RAW += [  # structured outputs: what cannot be compiled, or would compile for too long, is a 4xx
    ("schema 70 deep", _structured(_schema(json.loads('{"items": ' * 70 + "{}" + "}" * 70))), 400),
    ("schema 300 properties", _structured(_schema({"properties": {f"p{i}": {} for i in range(300)}})), 400),
    ("schema NaN bound", b'{"prompt": "hi", "max_tokens": 4, "response_format": {"type": "json_schema", '
                         b'"json_schema": {"name": "x", "schema": {"type": "number", "minimum": NaN}}}}', 400),
    ("schema huge bound", _structured(_schema({"type": "integer", "maximum": 10**400})), 400),
    ("schema denormal bound", _structured(_schema({"type": "number", "minimum": 5e-324})), 200),
    ("schema unknown type", _structured(_schema({"type": "tensor"})), 400),
    ("schema not an object", _structured(json="[1, 2]"), 400),
    ("schema text not JSON", _structured(json="{"), 400),
    ("json_schema without schema", _structured({"type": "json_schema"}), 400),
    ("response_format unknown type", _structured({"type": "yaml"}), 422),
    ("regex unbalanced", _structured(regex="(a"), 400),
    ("regex huge repeat", _structured(regex="a{1,4294967296}"), 400),
    ("regex empty", _structured(regex=""), 400),
    ("grammar without root", _structured(grammar='start ::= "a"'), 400),
    ("grammar left recursive", _structured(grammar='root ::= root "a" | "b"'), 200),
    ("choice 2000", _structured(choice=["a"] * 2000), 400),
    ("choice empty string", _structured(choice=["a", ""]), 400),
    ("two structures", _structured(regex="a", grammar='root ::= "a"'), 400),
    ("unknown structure", _structured(xml="<a/>"), 422),
    ("structure and min_tokens", json.dumps({"prompt": "hi", "max_tokens": 4, "min_tokens": 1,
                                             "structured_outputs": {"regex": "a+"}}).encode(), 400),
    ("regex served", _structured(regex="[a-c]{2}"), 200),
    ("surrogate escape in regex", b'{"prompt": "hi", "max_tokens": 2, "structured_outputs": {"regex": "\\\\ud800"}}',
     200),
    ("lone surrogate in choice", b'{"prompt": "hi", "max_tokens": 2, "structured_outputs": {"choice": ["\\ud800"]}}',
     422),
]


@pytest.mark.parametrize("what,body,want", RAW, ids=[r[0] for r in RAW])
def test_raw_bodies(server, what, body, want):
    r = httpx.post(server["http"] + "/v1/completions", content=body, timeout=TIMEOUT,
                   headers={**AUTH, "content-type": "application/json"})
    STATS["http"] += 1
    _check_http(r)
    if want is not None:
        assert r.status_code == want, (r.status_code, r.text[:300])


@pytest.mark.parametrize("path,what,body,want", TOKENIZE_RAW, ids=[r[1] for r in TOKENIZE_RAW])
def test_raw_tokenize_bodies(server, path, what, body, want):
    r = httpx.post(server["http"] + path, content=body, timeout=TIMEOUT,
                   headers={**AUTH, "content-type": "application/json"})
    STATS["http"] += 1
    _check_http(r)
    assert r.status_code == want, (r.status_code, r.text[:300])


# JSON escapes can spell a lone surrogate, which no UTF-8 check of the bytes catches (hypothesis's
# text() never draws one, and a client's JSON encoder refuses to send one: hence raw bodies)
SURROGATES = [
    ("/v1/completions", b'{"prompt": "hi \\ud800", "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": ["hi\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["x\\ud83d"], "max_tokens": 2, "stream": true}'),
    ("/v1/completions", b'{"prompt": "hi", "model": "tiny-opt-v1\\udc00", "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi\\ud800"}], "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user\\ud800", "content": "hi"}], "max_tokens": 2}'),
]


@pytest.mark.parametrize("path,body", SURROGATES, ids=[f"{'chat' if 'chat' in p else 'completion'}-{i}" for i, (p, _) in enumerate(SURROGATES)])
def test_lone_surrogates_are_refused(server, path, body):
    headers = {**AUTH, "content-type": "application/json"}
    r = httpx.post(server["http"] + path, content=body, timeout=TIMEOUT, headers=headers)
    STATS["http"] += 1
    _check_http(r)
    assert r.status_code == 422 and "lone surrogate" in r.json()["error"]["message"], r.text[:300]
    # the same request without the surrogate is served
    ok = httpx.post(server["http"] + path, content=re.sub(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", b"", body),
                    timeout=TIMEOUT, headers=headers)
    assert ok.status_code == 200, ok.text[:300]


# generation controls aptray does not implement: refused with a message naming them, unless sent at
# their no-op values (what clients and benchmark tools send by default)
UNHONOURED = [(path, *control)
              for control in (("best_of", 2, 1), ("suffix", "end", ""),
                              ("spaces_between_special_tokens", False, True), ("priority", 5, 0),
                              ("guided_whitespace_pattern", "[ ]?", None), ("modalities", ["text", "audio"], ["text"]))
              for path in ("/v1/completions", "/v1/chat/completions")]
# a chat's (a completion echoes its prompt; aptray.serve.openai_api.UNSUPPORTED)
UNHONOURED += [("/v1/chat/completions", "echo", True, False),
               ("/v1/chat/completions", "chat_template", "{{ 1 }}", None)]
# tools are chat's (aptray.serve.tools): a completion refuses them
UNHONOURED += [("/v1/completions", "tools", [{"type": "function", "function": {"name": "f"}}], []),
               ("/v1/completions", "tool_choice", "required", "none")]


@pytest.mark.parametrize("path,field,value,noop", UNHONOURED,
                         ids=[f"{u[1]}-{'chat' if 'chat' in u[0] else 'completion'}" for u in UNHONOURED])
def test_generation_controls_it_cannot_honour_are_refused(server, path, field, value, noop):
    body = {"prompt": "hi"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    body["max_tokens"] = 2
    r = httpx.post(server["http"] + path, json={**body, field: value}, headers=AUTH, timeout=TIMEOUT)
    STATS["http"] += 1
    _check_http(r)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text[:300]
    assert f"{field} is not supported" in r.json()["error"]["message"]
    ok = httpx.post(server["http"] + path, json={**body, field: noop, "user": "someone"}, headers=AUTH, timeout=TIMEOUT)
    assert ok.status_code == 200, ok.text[:300]


@pytest.mark.parametrize("extra,want,param", [
    ({"top_logprobs": 3}, 400, "top_logprobs"),  # top_logprobs needs logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, 422, None),
    ({"logprobs": True, "top_logprobs": -1}, 422, None),
    ({"logprobs": 3}, 422, None),  # completions' integer: chat takes a boolean
    ({"logprobs": 1}, 422, None),  # not read as true
    ({"logprobs": False, "top_logprobs": 0}, 200, None),  # the defaults clients send
    ({"logprobs": True, "top_logprobs": 20}, 200, None),
], ids=["top without logprobs", "top 21", "top -1", "logprobs integer", "logprobs 1", "defaults", "top 20"])
def test_chat_logprobs_fields(server, extra, want, param):
    r = _chat(server, extra, want, param, max_tokens=2)
    if want == 200:
        logprobs = r.json()["choices"][0]["logprobs"]
        assert (logprobs is None) == (not extra["logprobs"])
        if logprobs:
            assert [len(t["top_logprobs"]) for t in logprobs["content"]] == [20] * len(logprobs["content"])


def _tool(name="f", parameters=None) -> dict:
    return {"type": "function", "function": {"name": name, **({"parameters": parameters} if parameters else {})}}


NAMED = {"type": "function", "function": {"name": "f"}}
TOOL_BODIES = [  # (what, the chat body's extra fields, status, param)
    ("129 tools", {"tools": [_tool(f"f{i}") for i in range(129)], "tool_choice": "required"}, 400, "tools"),
    ("name with a space", {"tools": [_tool("a b")], "tool_choice": "required"}, 400, "tools"),
    ("name of 65 characters", {"tools": [_tool("x" * 65)], "tool_choice": "required"}, 400, "tools"),
    ("name not a string", {"tools": [{"type": "function", "function": {"name": 5}}], "tool_choice": "none"}, 422,
     None),
    ("two tools of one name", {"tools": [_tool(), _tool()], "tool_choice": NAMED}, 400, "tools"),
    ("auto with tools", {"tools": [_tool()], "tool_choice": "auto"}, 400, "tool_choice"),
    ("tools without a choice", {"tools": [_tool()]}, 400, "tool_choice"),
    ("named function not a tool", {"tools": [_tool("g")], "tool_choice": NAMED}, 400, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, 400, "tool_choice"),
    ("unknown tool_choice", {"tools": [_tool()], "tool_choice": "sometimes"}, 422, None),
    ("tool type not function", {"tools": [{"type": "retrieval", "function": {"name": "f"}}], "tool_choice": "none"},
     422, None),
    ("parameters 70 deep", {"tools": [_tool(parameters=json.loads('{"items": ' * 70 + "{}" + "}" * 70))],
                            "tool_choice": NAMED}, 400, "structured_outputs"),
    ("parameters that do not compile", {"tools": [_tool(parameters={"type": "tensor"})], "tool_choice": "required"},
     400, "structured_outputs"),
    ("tools with response_format", {"tools": [_tool()], "tool_choice": NAMED,
                                    "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    ("huge tool_calls in a message", {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "x" * 60000}}]},
        {"role": "user", "content": "hi"}]}, 400, "messages"),
    ("auto without tools (clients' default)", {"tool_choice": "auto"}, 200, None),
    ("none with tools", {"tools": [_tool()], "tool_choice": "none"}, 200, None),
    ("named call served", {"tools": [_tool(parameters={"type": "object", "properties": {"a": {"type": "integer"}}})],
                           "tool_choice": NAMED}, 200, None),
]


@pytest.mark.parametrize("what,extra,want,param", TOOL_BODIES, ids=[b[0] for b in TOOL_BODIES])
def test_tool_fields(server, what, extra, want, param):
    _chat(server, extra, want, param, max_tokens=4)


def _chat(server, extra: dict, want: int, param: str | None, max_tokens: int):
    """A chat request of "hi" with extra fields: its answer, with the status and the error's param wanted."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}
    r = httpx.post(server["http"] + "/v1/chat/completions", json=body, headers=AUTH, timeout=TIMEOUT)
    STATS["http"] += 1
    _check_http(r)
    assert r.status_code == want, r.text[:300]
    if param:
        assert r.json()["error"]["param"] == param, r.text[:300]
    return r


def test_half_sent_bodies_get_408_and_others_are_served(server):
    """Clients that send headers and part of a body, then stop, get 408 once body_timeout_s has passed,
    and hold nothing after: a normal request sent meanwhile, and one after, are served."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(server["http"]).hostname, urlsplit(server["http"]).port
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n").encode()
    stalled = [socket.create_connection((host, port), timeout=TIMEOUT) for _ in range(8)]
    started = time.monotonic()
    for conn in stalled:
        conn.sendall(head + b'{"prompt": "hel')
    ok = httpx.post(server["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH,
                    timeout=TIMEOUT)
    assert ok.status_code == 200, ok.text
    for conn in stalled:
        reply = b""
        while b"\r\n\r\n" not in reply:
            part = conn.recv(4096)
            assert part, "closed without an answer"
            reply += part
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        conn.close()
    waited = time.monotonic() - started
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + 20, waited
    after = httpx.post(server["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH,
                       timeout=TIMEOUT)
    assert after.status_code == 200, after.text


def test_oversized_body_without_length_is_refused(server):
    def chunks():  # chunked transfer: no Content-Length to refuse early on
        for _ in range(8):
            yield b"x" * (MAX_BODY // 4)
    r = httpx.post(server["http"] + "/v1/completions", content=chunks(), headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_unknown_path_and_method(server):
    assert httpx.get(server["http"] + "/v1/nothing", headers=AUTH, timeout=TIMEOUT).json()["error"]["code"] == 404
    r = httpx.get(server["http"] + "/v1/completions", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_client_disconnects_mid_stream_free_their_blocks(server):
    for _ in range(5):
        with httpx.stream("POST", server["http"] + "/v1/completions", headers=AUTH, timeout=TIMEOUT,
                          json={"prompt": "hello", "max_tokens": 4, "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())
    deadline = time.time() + 15
    while time.time() < deadline:
        text = httpx.get(server["http"] + "/metrics", headers=AUTH, timeout=TIMEOUT).text
        if metric(text, "aptray_cache_blocks_in_use", '{kind="kv"}') == 0:
            break
        time.sleep(0.2)
    assert metric(text, "aptray_cache_blocks_in_use", '{kind="kv"}') == 0
    assert httpx.get(server["http"] + "/health", timeout=TIMEOUT).status_code == 200


# -- gRPC --------------------------------------------------------------------------------------
GRPC_OK = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"}


@st.composite
def grpc_requests(draw):
    """Half sane requests (that should generate), half with every field drawn from its whole type."""
    from aptray.proto import generate_pb2
    sane = draw(st.booleans())
    req = generate_pb2.GenerateRequest(version=3 if sane else draw(st.sampled_from([0, 1, 2, 3, 4, 5, 2**32 - 1])),
                                       client_request_id="" if sane else draw(st.sampled_from(["", "dup", "a:b", "x" * 300])))
    if draw(st.booleans()):
        req.prompt = draw(st.text(min_size=1 if sane else 0, max_size=60))
    elif sane:
        req.prompt_token_ids.ids.extend(draw(st.lists(st.integers(min_value=0, max_value=200), min_size=1,
                                                      max_size=6)))
    else:
        req.prompt_token_ids.ids.extend(draw(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1),
                                                      max_size=6)))
    s = req.sampling
    if sane:
        s.max_tokens = draw(st.integers(1, 4))
        s.temperature = draw(st.floats(0, 2, width=32))
        s.seed = draw(st.integers(0, 2**31))
        s.top_k = draw(st.integers(-1, 50))
        if draw(st.booleans()):
            s.logprobs = draw(st.integers(0, 20))
    else:
        f32 = st.floats(width=32)  # NaN and infinities included
        for name, strat in (("temperature", f32), ("top_p", f32), ("top_k", st.integers(-(2**31), 2**31 - 1)),
                            ("max_tokens", st.integers(-(2**31), 2**31 - 1)),
                            ("seed", st.integers(-(2**63), 2**63 - 1))):
            if draw(st.booleans()):
                setattr(s, name, draw(strat))
        s.stop.extend(draw(st.lists(st.text(max_size=4), max_size=3)))
        s.stop_token_ids.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
        for name, strat in (("min_p", f32), ("min_tokens", st.integers(-(2**31), 2**31 - 1)),
                            ("logprobs", st.integers(-(2**31), 2**31 - 1)), ("presence_penalty", f32),
                            ("frequency_penalty", f32), ("repetition_penalty", f32)):
            if draw(st.booleans()):
                setattr(s, name, draw(strat))
        if draw(st.booleans()):  # a structure of any kind, any text
            kind = draw(st.sampled_from(["json_schema", "regex", "grammar", "choice", "json_object", None]))
            so = s.structured_output
            if kind == "choice":
                so.choice.choices.extend(draw(st.lists(st.text(max_size=8), max_size=3)))
            elif kind == "json_object":
                so.json_object = draw(st.booleans())
            elif kind is not None:
                setattr(so, kind, draw(st.text(max_size=40)))
            else:
                so.SetInParent()
        for name in ("skip_special_tokens", "include_stop_str_in_output"):
            if draw(st.booleans()):
                setattr(s, name, draw(st.booleans()))
        if draw(st.booleans()):
            s.cache_salt = draw(st.one_of(st.text(max_size=8), st.sampled_from(["", "s" * 300])))
        s.allowed_token_ids.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
        s.bad_words.extend(draw(st.lists(st.one_of(st.text(max_size=6), st.sampled_from([" ", "x" * 300])),
                                         max_size=3)))
        s.logit_bias.update(draw(st.dictionaries(st.integers(-(2**63), 2**63 - 1), f32, max_size=3)))
        if draw(st.booleans()):
            req.slo.ttft_ms = draw(st.floats())
        if draw(st.booleans()):  # 0 is 1; over 16 is refused
            req.n = draw(st.sampled_from([0, 1, 2, 3, 17, 2**32 - 1]))
    return req


def test_grpc_fuzz(server):
    import grpc

    from aptray.proto import generate_pb2_grpc
    channel = grpc.insecure_channel(server["grpc"])
    stub = generate_pb2_grpc.GenerationStub(channel)
    md = (("application", "aptray"), ("authorization", f"Bearer {KEY}"))

    @FUZZ
    @given(req=grpc_requests())
    def run(req):
        STATS["grpc"] += 1
        try:
            replies = list(stub.Generate(req, metadata=md, timeout=TIMEOUT))
            code = "OK"
            assert replies and replies[-1].finished
        except grpc.RpcError as e:
            code = e.code().name
        STATS["codes"][f"grpc:{code}"] = STATS["codes"].get(f"grpc:{code}", 0) + 1
        assert code in GRPC_OK, code
    run()
    channel.close()


def test_grpc_refusals_leave_no_traceback_in_serves_logs(server):
    """Serve logs a traceback for each gRPC call that raised, in the replica and in the proxy; refusals
    (aptray.serve.grpc_refusal_logs) leave none, where a served call and a refused one alike are logged."""
    import grpc
    import ray

    from aptray.client import Client
    with Client(server["grpc"], api_key=KEY) as c:
        for kw in ({"max_tokens": 0}, {"max_tokens": 2, "ttft_ms": -1.0}):
            with pytest.raises(grpc.RpcError) as e:
                list(c.generate([5] * 8, **kw))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(c.generate([5] * 8, max_tokens=2))[-1].finished
    logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    replica_logs, proxy_logs = list(logs.glob("replica_*Ingress*.log")), list(logs.glob("proxy_*.log"))
    assert replica_logs and proxy_logs
    for path in replica_logs + proxy_logs:
        text = path.read_text(errors="replace")
        assert "Request failed" not in text, (path.name, text[text.index("Request failed"):][:3000])


def test_grpc_garbage_bytes_and_still_serving(server):
    """Bytes that are no GenerateRequest get INVALID_ARGUMENT (aptray.serve.grpc_registration's
    deserializer), a message over Serve's limit RESOURCE_EXHAUSTED, and the app keeps serving."""
    import grpc

    from aptray.client import Client
    from aptray.proto import generate_pb2
    from aptray.serve.grpc_registration import GRPC_MAX_MESSAGE_BYTES
    channel = grpc.insecure_channel(server["grpc"], options=[("grpc.max_send_message_length", -1)])
    raw = channel.unary_stream("/aptray.generate.v1.Generation/Generate", request_serializer=None,
                               response_deserializer=None)
    md = (("application", "aptray"), ("authorization", f"Bearer {KEY}"))
    big = generate_pb2.GenerateRequest(prompt="a" * (2 * GRPC_MAX_MESSAGE_BYTES)).SerializeToString()
    for junk, want in ((b"\xff" * 64, "INVALID_ARGUMENT"), (b"\x0a\x05\xff\xfe\xfd\xfc\xfb", "INVALID_ARGUMENT"),
                       (big, "RESOURCE_EXHAUSTED"), (os.urandom(256), None)):
        try:
            list(raw(junk, metadata=md, timeout=TIMEOUT))
        except grpc.RpcError as e:
            STATS["codes"][f"grpc-garbage:{e.code().name}"] = STATS["codes"].get(f"grpc-garbage:{e.code().name}", 0) + 1
            assert e.code().name == want if want else e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                                         grpc.StatusCode.UNKNOWN), e.details()
        else:
            assert want is None
    channel.close()
    with Client(server["grpc"], api_key=KEY) as c:
        assert list(c.generate("hello", max_tokens=2))[-1].finished
