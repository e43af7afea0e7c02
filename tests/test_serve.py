"""Serving path end to end on real Ray (one instance for the module), real gRPC, real Redis.

TP=2 shards over gloo; the ingress is reached with the official openai client, httpx and the
aptray gRPC client. Kept small: the whole module should run in a few minutes on 2 cores.
"""
import asyncio
import json
import os
import signal
import time
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import ray.serve as serve
import httpx
import openai

from aptray.llm import LLM  # noqa: E402
from aptray.sampling_params import SamplingParams  # noqa: E402
from aptray.model.demo import demo_model_dir, ensure_demo_model  # noqa: E402
from serve_tools import start_proxies  # noqa: E402

PROMPTS = ["The quick brown fox", "What is the capital of France?", "def add(a, b):"]
MAX_TOKENS = 12
SLOW = 200  # tokens for requests that must still be running while we look


@pytest.fixture(scope="module")
def model_path():
    return ensure_demo_model(demo_model_dir())


@pytest.fixture(scope="module")
def ray_session():
    ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy outputs of the single-process engine: what every served path must reproduce."""
    llm = LLM(model_path, num_cache_blocks=64)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, sp)
    return llm.tokenizer, {p: (o.outputs[0].token_ids, o.outputs[0].text) for p, o in zip(PROMPTS, outs)}


# -- TP=2 shards vs the single-process engine -----------------------------------------------------
# TP=2 runs the hidden cache as KV (a replicated hidden vector saves nothing per rank: r = 1), so
# hidden-cache plans over gRPC are checked with one shard
@pytest.mark.parametrize("tp,cache_mode", [(2, "kv"), (2, "auto"), (1, "hidden")])
def test_ray_executor_matches_local_engine(ray_session, model_path, reference, tp, cache_mode):
    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.ray import RayExecutor

    tokenizer, ref = reference
    local = LLM(model_path, num_cache_blocks=64, cache_mode=cache_mode)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in local.generate(PROMPTS, sp)]
    config = EngineConfig(model=model_path, tensor_parallel_size=tp, num_cache_blocks=64, cache_mode=cache_mode)
    executor = RayExecutor(config, use_gpu=False)
    try:
        engine = Engine(config, executor, tokenizer)
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), tokenizer.encode(p), sp)
        got = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out.outputs[0].token_ids
        assert [got[str(i)] for i in range(len(PROMPTS))] == want
    finally:
        executor.shutdown()


def test_tp2_shares_cached_prefixes_exactly(ray_session, model_path):
    """TP=2 with prefix caching: the router's block manager alone decides which blocks requests share
    (every rank holds the same blocks); a second wave starts from the first's cached system prompt
    and every token equals transformers' greedy generate."""
    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.ray import RayExecutor
    from tiny_models import hf_greedy

    system = list(range(10, 42))  # 32 tokens: 8 blocks of 4
    waves = [[system + [50 + i, 60 + i, 70] for i in range(2)], [system + [80 + i] * 3 for i in range(2)]]
    config = EngineConfig(model=model_path, tensor_parallel_size=2, num_cache_blocks=64, block_size=4)
    executor = RayExecutor(config, use_gpu=False)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    try:
        engine = Engine(config, executor)
        got = {}
        for w, wave in enumerate(waves):
            for i, prompt in enumerate(wave):
                engine.add_request(f"{w}-{i}", prompt, sp)
            while engine.has_unfinished():
                got |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        assert engine.scheduler.stats["prefix_hit_tokens"] >= 2 * 32
        for w, wave in enumerate(waves):
            for i, prompt in enumerate(wave):
                assert tuple(got[f"{w}-{i}"]) == hf_greedy(model_path, tuple(prompt), MAX_TOKENS), (w, i)
    finally:
        executor.shutdown()


def test_dead_shard_fails_the_step_fast(ray_session, model_path, reference):
    import grpc

    from aptray.config import EngineConfig
    from aptray.engine import Engine, StepFailed
    from aptray.executor.ray import RayExecutor

    tokenizer, _ = reference
    config = EngineConfig(model=model_path, tensor_parallel_size=2, num_cache_blocks=64)
    executor = RayExecutor(config, use_gpu=False)
    try:
        engine = Engine(config, executor, tokenizer)
        engine.add_request("a", tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=200, ignore_eos=True))
        engine.step()
        ray.kill(executor.shards[1])  # asynchronous: wait until it has landed
        with pytest.raises(ray.exceptions.RayActorError):
            while True:
                ray.get(executor.shards[1].node_address.remote(), timeout=60)
        t = time.time()
        with pytest.raises(StepFailed) as failed:
            while time.time() - t < 15 and engine.has_unfinished():
                engine.step()
        assert isinstance(failed.value.cause, grpc.RpcError)
        assert time.time() - t < 15  # not the 600 s step timeout: rank 0 is stuck in a collective
    finally:
        executor.shutdown()


def test_offline_llm_shards_for_real(ray_session, model_path, reference):
    """LLM(tensor_parallel_size=2) runs two shard actors (as vLLM's LLM does), not one unsharded rank,
    and generates what one rank does."""
    tokenizer, ref = reference
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    def shards():
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("aptray-shard-")}
    before = shards()
    with LLM(model_path, tensor_parallel_size=2, num_cache_blocks=64) as llm:
        assert sorted(name[-5:] for name in shards() - before) == ["rank0", "rank1"]
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp)] == [ref[p][0] for p in PROMPTS]


def test_shard_ports_serve_their_router_only(ray_session, model_path):
    """Shards listen on the node's address (not 0.0.0.0) and refuse every call without their
    router's secret: nothing else on the network can send Plan() or read Info()."""
    import grpc
    import psutil

    from aptray.config import EngineConfig
    from aptray.executor.ray import RayExecutor
    from aptray.plan import BatchPlan
    from aptray.proto import shard_pb2, shard_pb2_grpc
    from aptray.proto.convert import plan_to_proto
    from aptray.worker.shard_auth import SECRET_METADATA

    executor = RayExecutor(EngineConfig(model=model_path, tensor_parallel_size=1, num_cache_blocks=16), use_gpu=False)
    try:
        ip, port = executor.endpoints[0]
        listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                     and c.status == psutil.CONN_LISTEN]
        assert listening and "0.0.0.0" not in listening and "::" not in listening
        with grpc.insecure_channel(f"{ip}:{port}") as ch:
            stub = shard_pb2_grpc.ShardStub(ch)
            for metadata in ((), ((SECRET_METADATA, "guess"),)):
                for call, msg in ((stub.Info, shard_pb2.ShardInfoRequest()), (stub.Plan, plan_to_proto(BatchPlan(1)))):
                    with pytest.raises(grpc.RpcError) as e:
                        call(msg, metadata=metadata, timeout=10)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert executor.alive()  # the router's own calls carry the secret
        assert executor.execute(BatchPlan(1)).sampled == {}
    finally:
        executor.shutdown()


@ray.remote(num_cpus=0)
class _StoreHolder:
    def __init__(self):
        from aptray.serve.store import RequestStore
        self.store = RequestStore.embedded()

    def pids(self) -> tuple[int, int]:
        return os.getpid(), self.store._owner.server.proc.pid


def test_an_embedded_redis_goes_with_the_worker_that_started_it(ray_session):
    """A replica's embedded Redis is its child (store.py), so Ray ends it with the replica's worker, even
    one killed outright: a crashed replica leaves no server behind."""
    import psutil
    holder = _StoreHolder.remote()
    worker, server = ray.get(holder.pids.remote())
    assert psutil.Process(server).ppid() == worker
    os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 20
    while _running(server):
        assert time.time() < deadline, "the embedded Redis outlived its worker"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- the served app -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_server():
    from aptray.serve.store import EmbeddedServer
    server = EmbeddedServer()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def server(ray_session, model_path, redis_server):
    from aptray.app import build_app

    addresses = start_proxies()
    args = {"tensor_parallel_size": 2, "num_cache_blocks": 128, "max_num_seqs": 4, "max_queue": 4,
            "redis_url": f"unix://{redis_server.socket_file}", "finished_ttl_s": 2, "use_gpu": False}
    serve.run(build_app(args), name="aptray", route_prefix="/")
    yield {**addresses, "model": os.path.basename(model_path), "redis": redis_server}
    serve.delete("aptray")


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server["http"] + "/v1", api_key="unused", max_retries=0)


GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


def test_models_and_health(server, oai):
    """/v1/models lists the served model, the SDK's retrieve finds it (and 404 for another);
    /version is the installed package's; /health answers 200, to HEAD as well (load balancers' probes)."""
    import importlib.metadata

    models = httpx.get(server["http"] + "/v1/models").json()
    assert models["data"][0]["id"] == server["model"]
    card = oai.models.retrieve(server["model"])
    assert card.id == server["model"] and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")
    assert httpx.get(server["http"] + "/version").json() == {"version": importlib.metadata.version("aptray")}
    assert httpx.get(server["http"] + "/health").status_code == 200
    head = httpx.head(server["http"] + "/health")
    assert head.status_code == 200 and head.content == b""


def test_openai_completion_matches_reference(server, oai, reference):
    _, ref = reference
    for p in PROMPTS[:2]:
        r = oai.completions.create(model=server["model"], prompt=p, **GREEDY)
        assert r.choices[0].text == ref[p][1]
        assert r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"


def test_openai_completion_stream(server, oai, reference):
    _, ref = reference
    p = PROMPTS[2]
    pieces, usage = [], None
    for chunk in oai.completions.create(model=server["model"], prompt=p, stream=True,
                                        stream_options={"include_usage": True}, **GREEDY):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == ref[p][1]
    assert len(pieces) == MAX_TOKENS and usage.completion_tokens == MAX_TOKENS


def test_continuous_usage_stats_count_each_events_tokens(server, oai, reference):
    """vLLM's stream_options.continuous_usage_stats: every event carries the usage so far (the chat's
    role event: the prompt's alone); the last is the whole request's usage, as with include_usage."""
    tokenizer, ref = reference
    p = PROMPTS[2]
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(oai.completions.create(model=server["model"], prompt=p, stream=True, stream_options=options,
                                         **GREEDY))
    prompt_tokens = len(tokenizer.encode(p))
    for chunk in chunks[:-1]:
        assert chunk.usage.prompt_tokens == prompt_tokens
        assert chunk.usage.total_tokens == prompt_tokens + chunk.usage.completion_tokens
    assert [c.usage.completion_tokens for c in chunks[:-1]] == list(range(1, MAX_TOKENS + 1))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == ref[p][1]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == MAX_TOKENS
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    events = list(oai.chat.completions.create(model=server["model"], messages=msgs, stream=True,
                                              stream_options=options, **GREEDY))
    assert events[0].choices[0].delta.role == "assistant" and events[0].usage.completion_tokens == 0
    assert [e.usage.completion_tokens for e in events[1:-1]] == list(range(1, MAX_TOKENS + 1))
    assert len({e.usage.prompt_tokens for e in events}) == 1
    # without include_usage it asks for nothing
    plain = list(oai.completions.create(model=server["model"], prompt=p, stream=True,
                                        stream_options={"continuous_usage_stats": True}, **GREEDY))
    assert all(c.usage is None for c in plain) and len(plain) == MAX_TOKENS


def test_responses_api_is_the_chat_completion_of_its_input(server, oai):
    """OpenAI's Responses API through its SDK: instructions and input are the chat's system and user
    messages, the output text that chat's greedy reply, cut at max_output_tokens (status incomplete);
    streamed, its deltas make the same text between numbered events, ending with the response; text.format
    holds the output to a schema; input as message items is the same as text; what would need state or
    tools is refused (400 naming it)."""
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPTS[1]}]
    chat = oai.chat.completions.create(model=server["model"], messages=msgs, **GREEDY)
    kw = dict(model=server["model"], instructions="Answer briefly.", max_output_tokens=MAX_TOKENS, temperature=0.0,
              extra_body={"ignore_eos": True})
    r = oai.responses.create(input=PROMPTS[1], **kw)
    assert r.output_text == chat.choices[0].message.content and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"  # the message was cut, as the response was
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, MAX_TOKENS)
    items = [{"role": "user", "content": [{"type": "input_text", "text": PROMPTS[1]}]}]
    assert oai.responses.create(input=items, **kw).output_text == r.output_text
    events = list(oai.responses.create(input=PROMPTS[1], stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}}
    held = oai.responses.create(model=server["model"], input="a number", text=fmt, max_output_tokens=64)
    assert held.status == held.output[0].status == "completed" and set(json.loads(held.output_text)) == {"n"}
    for field, value in (("previous_response_id", "resp_1"), ("tools", [{"type": "web_search"}]),
                         ("background", True), ("n", 2), ("max_tokens", 4)):
        r = httpx.post(server["http"] + "/v1/responses", json={"input": "hi", field: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    # the answering chat completion's refusals name the Responses API's fields
    r = httpx.post(server["http"] + "/v1/responses", json={"input": "hi", "max_output_tokens": 10**6}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens", r.text
    assert "max_tokens" not in r.json()["error"]["message"], r.text


def test_usage_counts_the_prompt_tokens_found_cached(server, oai, reference):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's): 0 for a new prompt; for the same prompt
    again its full blocks of 16 but the last token's, whole or streamed; gRPC's Usage.cached_tokens
    likewise."""
    from aptray.client import Client

    tokenizer, _ = reference
    text = f"{uuid.uuid4().hex} " + "the part of a prompt that the cache keeps " * 8
    cached = (len(tokenizer.encode(text)) - 1) // 16 * 16
    first = oai.completions.create(model=server["model"], prompt=text, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = oai.completions.create(model=server["model"], prompt=text, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == cached > 0
    last = list(oai.completions.create(model=server["model"], prompt=text, max_tokens=2, stream=True,
                                       stream_options={"include_usage": True}))[-1]
    assert last.usage.prompt_tokens_details.cached_tokens == cached
    with Client(server["grpc"]) as c:
        assert list(c.generate(text, max_tokens=2))[-1].usage.cached_tokens == cached


def test_openai_chat_stream_and_not(server, oai):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    whole = oai.chat.completions.create(model=server["model"], messages=msgs, seed=7, stop=["zzz"], **GREEDY)
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=server["model"], messages=msgs, stream=True, seed=7, stop=["zzz"], **GREEDY) if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == MAX_TOKENS


def test_chat_content_as_text_parts_is_their_joined_text(server, oai):
    """A message's content as a list of text parts, as the OpenAI SDK, LangChain and vLLM's clients
    send it, is served as the string of its texts joined with newlines (vLLM's rule): the same prompt
    and greedy reply; a part other than text is a 400 naming it (tests/test_chat_content.py)."""
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    want = oai.chat.completions.create(model=server["model"], **GREEDY, messages=[
        {"role": "user", "content": "What is the capital\nof France?"}])
    got = oai.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": parts}], **GREEDY)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    r = httpx.post(server["http"] + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": [parts[0], image]}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1].type", r.text
    assert "this model takes text only" in r.json()["error"]["message"]


def test_logit_bias_min_tokens_and_min_p_reach_the_shards_over_http_and_grpc(server, reference):
    """Through the TP=2 app, whose plans cross gRPC to the shards: a +100 bias makes every greedy
    token the biased one; min_tokens holds off an EOS the bias forces; HTTP and gRPC alike."""
    import grpc

    from aptray.client import Client, build_request
    from aptray.serve.grpc_api import API_VERSION

    tokenizer, _ = reference
    eos, p, url = tokenizer.eos_token_id, PROMPTS[0], server["http"] + "/v1/completions"
    forced = {"prompt": p, "temperature": 0.0, "max_tokens": 4, "ignore_eos": True, "logit_bias": {"17": 100},
              "return_token_ids": True}
    assert httpx.post(url, json=forced, timeout=60).json()["choices"][0]["token_ids"] == [17] * 4
    held = {"prompt": p, "temperature": 1.0, "seed": 3, "min_p": 0.1, "max_tokens": 8, "min_tokens": 3,
            "logit_bias": {str(eos): 100}, "return_token_ids": True}
    choice = httpx.post(url, json=held, timeout=60).json()["choices"][0]
    assert eos not in choice["token_ids"][:3] and choice["token_ids"][3:] == [eos], choice
    assert choice["finish_reason"] == "stop"
    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias={17: 100.0}))
        assert [t for r in replies for t in r.token_ids] == [17] * 4
        replies = list(c.generate(p, temperature=1.0, seed=3, min_p=0.1, max_tokens=8, min_tokens=3,
                                  logit_bias={eos: 100.0}))
        tokens = [t for r in replies for t in r.token_ids]
        assert eos not in tokens[:3] and tokens[3:] == [eos] and replies[-1].finish_reason == "stop"
        # the request names the version of the fields it sets; a newer version than the server's is refused
        assert build_request(p).version == 1 and build_request(p, logit_bias={17: 1.0}).version == 2
        assert build_request(p, min_p=0.1, logprobs=0).version == build_request(p, frequency_penalty=0.5).version == 3
        assert build_request(p, regex="a+").version == 4 and build_request(p, n=2).version == 5
        assert build_request(p, skip_special_tokens=False).version == build_request(p, cache_salt="a").version
        assert build_request(p, include_stop_str_in_output=True).version == API_VERSION == 6
        assert build_request(p, allowed_token_ids=[5]).version == 6
        assert build_request(p, truncate_prompt_tokens=3).version == 6
        assert build_request(p, bad_words=["a"]).version == 6
        too_new = build_request(p, min_p=0.1)
        too_new.version = API_VERSION + 1
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.Generate(too_new, metadata=c.metadata))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"speaks {API_VERSION}" in e.value.details()


def test_special_tokens_and_the_ending_token_in_the_text_over_http_and_grpc(server, reference):
    """skip_special_tokens=false shows special tokens, streamed and not; the EOS that ends the output
    is in its token ids, and in its text only with include_stop_str_in_output (HTTP and gRPC)."""
    from aptray.client import Client

    tokenizer, _ = reference
    pad, eos, p, url = tokenizer.pad_token_id, tokenizer.eos_token_id, PROMPTS[0], server["http"] + "/v1/completions"
    body = {"prompt": p, "temperature": 0.0, "max_tokens": 6, "min_tokens": 2, "return_token_ids": True,
            "logit_bias": {str(pad): 50, str(eos): 100}}
    want = tokenizer.decode([pad, pad], skip_special_tokens=False)
    kept = {"skip_special_tokens": False, "include_stop_str_in_output": True}
    for extra, text in (({}, ""), ({"skip_special_tokens": False}, want), (kept, want + tokenizer.eos_token)):
        choice = httpx.post(url, json={**body, **extra}, timeout=60).json()["choices"][0]
        assert choice["token_ids"] == [pad, pad, eos] and choice["text"] == text, (extra, choice)
        events = _sse_objects(httpx.post(url, json={**body, **extra, "stream": True}, timeout=60))
        assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == text
    with Client(server["grpc"]) as c:
        for extra, text in (({}, ""), ({"skip_special_tokens": False}, want)):
            replies = list(c.generate(p, temperature=0.0, max_tokens=6, min_tokens=2,
                                      logit_bias={pad: 50.0, eos: 100.0}, **extra))
            assert [t for r in replies for t in r.token_ids] == [pad, pad, eos]
            assert "".join(r.text for r in replies) == text


def test_allowed_token_ids_and_bad_words_over_http_and_grpc_are_the_engines(server, model_path):
    """Through the TP=2 app (the mask and the bans cross gRPC to the shards): the engine's tokens,
    all allowed; with the words of the free reply banned, the engine's."""
    from aptray.client import Client
    from aptray.sampling_params import bad_words_token_ids

    llm = LLM(model_path, num_cache_blocks=64)
    ids = llm.tokenizer.encode(PROMPTS[1])
    greedy = {"temperature": 0.0, "max_tokens": 10, "ignore_eos": True}
    free = llm.generate({"prompt_token_ids": ids}, SamplingParams(**greedy))[0].outputs[0]
    allowed = [7, 19, 23, 41, 42, 200]
    # words of the free reply that are one of its tokens, as written or after a space: the ban bites
    words = [w for w in {llm.tokenizer.decode([t]).strip() for t in free.token_ids} if w.isalpha()
             and any(seq in {(t,) for t in free.token_ids} for seq in bad_words_token_ids(llm.tokenizer, [w]))]
    assert words
    for control in ({"allowed_token_ids": allowed}, {"bad_words": sorted(words)[:3]}):
        want = list(llm.generate({"prompt_token_ids": ids}, SamplingParams(**greedy, **control))[0].outputs[0]
                    .token_ids)
        assert want != list(free.token_ids)
        got = httpx.post(server["http"] + "/v1/completions", timeout=60,
                         json={"prompt": ids, "return_token_ids": True, **greedy, **control}).json()
        assert got["choices"][0]["token_ids"] == want, control
        with Client(server["grpc"]) as c:
            assert [t for r in c.generate(ids, **greedy, **control) for t in r.token_ids] == want
        assert set(want) <= set(control.get("allowed_token_ids", want))


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server, model_path):
    """A prompt past the server's limit is served on its last k tokens (-1: as many as it takes):
    the engine's reply to those; HTTP (text and ids, chat) and gRPC. 0 is refused."""
    from aptray.client import Client

    llm = LLM(model_path, num_cache_blocks=64)
    text = "The quick brown fox jumps over the lazy dog. " * 600  # 27,000 characters: refused whole
    ids = llm.tokenizer.encode(text)
    url, greedy = server["http"] + "/v1/completions", {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}

    def engine(prompt_ids):
        return list(llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(**greedy))[0].outputs[0].token_ids)

    assert httpx.post(url, json={"prompt": text, **greedy}, timeout=60).status_code == 400
    for prompt in (text, ids):
        got = httpx.post(url, timeout=60, json={"prompt": prompt, "truncate_prompt_tokens": 40,
                                                "return_token_ids": True, **greedy}).json()["choices"][0]
        assert got["prompt_token_ids"] == ids[-40:] and got["token_ids"] == engine(ids[-40:])
    most = httpx.post(url, timeout=60, json={"prompt": ids, "truncate_prompt_tokens": -1, "return_token_ids": True,
                                             **greedy, "max_tokens": 1}).json()["choices"][0]
    assert most["prompt_token_ids"] == ids[-len(most["prompt_token_ids"]):] and len(most["prompt_token_ids"]) > 400
    refused = httpx.post(url, json={"prompt": "hi", "truncate_prompt_tokens": 0}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "truncate_prompt_tokens"
    chat = [{"role": "user", "content": text}]
    chat_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                                    add_special_tokens=False)
    got = httpx.post(server["http"] + "/v1/chat/completions", timeout=60, json={
        "messages": chat, "truncate_prompt_tokens": 30, "return_token_ids": True, **greedy}).json()
    assert got["prompt_token_ids"] == chat_ids[-30:] and got["choices"][0]["token_ids"] == engine(chat_ids[-30:])
    with Client(server["grpc"]) as c:
        replies = list(c.generate(text, truncate_prompt_tokens=40, **greedy))
        assert [t for r in replies for t in r.token_ids] == engine(ids[-40:])


def test_chat_template_options_and_special_tokens_are_the_offline_apis(server, model_path):
    """add_generation_prompt and continue_final_message reach the chat template as LLM.chat's do, and
    add_special_tokens the tokenizer: the same prompt ids, so the same greedy reply."""
    llm = LLM(model_path, num_cache_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    convo = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    url = server["http"] + "/v1/chat/completions"
    for opts in ({"add_generation_prompt": False, "continue_final_message": True}, {"add_generation_prompt": False},
                 {}):
        want = llm.chat(convo if opts else convo[:1], greedy, **opts)[0]
        got = httpx.post(url, json={"messages": convo if opts else convo[:1], "temperature": 0.0, "max_tokens": 8,
                                    "ignore_eos": True, "return_token_ids": True, **opts}, timeout=60).json()
        assert got["prompt_token_ids"] == list(want.prompt_token_ids), opts
        assert got["choices"][0]["message"]["content"] == want.outputs[0].text
    bos = llm.tokenizer.encode("Hello")[:-len(llm.tokenizer.encode("Hello", add_special_tokens=False))]
    assert bos  # this tokenizer adds one
    for add in (True, False):
        got = httpx.post(server["http"] + "/v1/completions", timeout=60, json={
            "prompt": "Hello", "max_tokens": 1, "return_token_ids": True, "add_special_tokens": add}).json()
        assert got["choices"][0]["prompt_token_ids"] == llm.tokenizer.encode("Hello", add_special_tokens=add)


def test_logprobs_over_http_and_grpc_are_the_engines(server, oai, model_path, reference):
    """Through the TP=2 app (logprobs cross gRPC from rank 0): completions and chat, streamed or not,
    through the official openai client, and gRPC, each token's log-probability and top 3 as the
    single-process engine computes them (tests/test_logprobs.py checks those against transformers)."""
    from aptray.client import Client

    tokenizer, ref = reference
    p = PROMPTS[1]
    llm = LLM(model_path, num_cache_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)
    local = llm.generate(p, greedy)[0].outputs[0]
    want = [lp.logprob for lp in local.logprobs]
    want_top = [[t for t, _ in lp.top] for lp in local.logprobs]
    texts = [tokenizer.decode([t]) for t in local.token_ids]
    assert list(local.token_ids) == ref[p][0]

    whole = oai.completions.create(model=server["model"], prompt=p, logprobs=3, **GREEDY).choices[0].logprobs
    assert whole.tokens == texts and whole.token_logprobs == pytest.approx(want, abs=1e-4)
    # keyed by token text, as OpenAI's shape is: tokens with the same text (byte pieces all read U+FFFD) share a key
    assert [list(top) for top in whole.top_logprobs] == [list({tokenizer.decode([t]): 0 for t in ids})
                                                         for ids in want_top]
    assert whole.text_offset == [sum(map(len, texts[:i])) for i in range(len(texts))]
    streamed = [c.choices[0].logprobs for c in oai.completions.create(model=server["model"], prompt=p, logprobs=3,
                                                                      stream=True, **GREEDY) if c.choices]
    assert [t for lp in streamed for t in lp.token_logprobs] == pytest.approx(want, abs=1e-4)
    assert [o for lp in streamed for o in lp.text_offset] == whole.text_offset

    messages = [{"role": "user", "content": p}]
    chat = oai.chat.completions.create(model=server["model"], messages=messages, logprobs=True, top_logprobs=3,
                                       **GREEDY)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False)
    chat_local = llm.generate({"prompt_token_ids": prompt_ids}, greedy)[0].outputs[0]
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in chat_local.logprobs], abs=1e-4)
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in chat_local.token_ids]
    # a token's bytes: its text's UTF-8, or where it holds part of a character, the byte-level bytes it stands for
    from aptray.outputs import token_bytes
    assert [c.bytes for c in content] == [list(token_bytes(tokenizer, t)) for t in chat_local.token_ids]
    assert all(c.bytes == list(c.token.encode()) for c in content if "\ufffd" not in c.token)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    chunks = oai.chat.completions.create(model=server["model"], messages=messages, logprobs=True, stream=True,
                                         **GREEDY)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    assert all(t.top_logprobs == [] for t in streamed)  # top_logprobs unset: 0
    assert oai.chat.completions.create(model=server["model"], messages=messages, **GREEDY).choices[0].logprobs is None

    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3))
        lps = [lp for r in replies for lp in r.logprobs]
        assert [lp.logprob for lp in lps] == pytest.approx(want, abs=1e-4)
        assert [list(lp.top_ids) for lp in lps] == want_top
        assert all(lp.HasField("logprob") for lp in lps)
        assert not any(r.logprobs for r in c.generate(p, temperature=0.0, max_tokens=2))


def test_penalties_over_http_and_grpc_are_the_engines(server, model_path, reference):
    """Through the TP=2 app (each plan carries the output's token counts to the shards): greedy
    outputs with presence and frequency penalties, and with a repetition penalty, equal the
    single-process engine's (tests/test_sampling.py checks those against OpenAI's formula over
    transformers' logits and against transformers' own processor)."""
    from aptray.client import Client

    tokenizer, ref = reference
    p, n = PROMPTS[0], 24
    llm = LLM(model_path, num_cache_blocks=64)
    local = llm.generate(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, presence_penalty=0.5,
                                           frequency_penalty=1.5))[0].outputs[0]
    plain = llm.generate(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0].outputs[0]
    assert list(local.token_ids) != list(plain.token_ids)  # the penalties change this output
    body = {"prompt": p, "temperature": 0.0, "max_tokens": n, "ignore_eos": True, "presence_penalty": 0.5,
            "frequency_penalty": 1.5, "return_token_ids": True}
    assert httpx.post(server["http"] + "/v1/completions", json=body, timeout=60).json()["choices"][0][
        "token_ids"] == list(local.token_ids)
    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, temperature=0.0, max_tokens=n, ignore_eos=True, presence_penalty=0.5,
                                  frequency_penalty=1.5))
        assert [t for r in replies for t in r.token_ids] == list(local.token_ids)
    # the repetition penalty: each plan carries the prompt's and the output's distinct tokens
    repeated = llm.generate(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                              repetition_penalty=1.6))[0].outputs[0]
    assert list(repeated.token_ids) != list(plain.token_ids)
    body = {"prompt": p, "temperature": 0.0, "max_tokens": n, "ignore_eos": True, "repetition_penalty": 1.6,
            "return_token_ids": True}
    assert httpx.post(server["http"] + "/v1/completions", json=body, timeout=60).json()["choices"][0][
        "token_ids"] == list(repeated.token_ids)
    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, temperature=0.0, max_tokens=n, ignore_eos=True, repetition_penalty=1.6))
        assert [t for r in replies for t in r.token_ids] == list(repeated.token_ids)


def test_structured_outputs_over_http_and_grpc_are_the_engines(server, oai, model_path):
    """Through the TP=2 app (each plan carries its grammar's allowed tokens to the shards): OpenAI's
    response_format and vLLM's structured_outputs over HTTP, and gRPC's structured_output, give the
    single-process engine's greedy tokens; a stream's text is the whole reply's; the server keeps
    serving."""
    import grpc

    from aptray.client import Client
    from aptray.structured_output import StructuredOutput

    schema = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    p, n = PROMPTS[1], 40
    llm = LLM(model_path, num_cache_blocks=64)
    asks = {"json": StructuredOutput("json", json.dumps(schema)), "regex": StructuredOutput("regex", r"[a-z]{3} \d"),
            "choice": StructuredOutput("choice", ("Paris", "Lyon"))}
    local = {k: llm.generate(p, SamplingParams(temperature=0.0, max_tokens=n, structured_output=so))[0].outputs[0]
             for k, so in asks.items()}
    assert json.loads(local["json"].text).keys() == {"ok", "n"} and local["choice"].text in ("Paris", "Lyon")
    bodies = {"json": {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}},
              "regex": {"structured_outputs": {"regex": r"[a-z]{3} \d"}},
              "choice": {"structured_outputs": {"choice": ["Paris", "Lyon"]}}}
    older = {"json": {"guided_json": schema}, "regex": {"guided_regex": r"[a-z]{3} \d"},
             "choice": {"guided_choice": ["Paris", "Lyon"]}}  # vLLM's older fields
    for kind, extra in [*bodies.items(), *older.items()]:
        body = {"prompt": p, "temperature": 0.0, "max_tokens": n, "return_token_ids": True, **extra}
        got = httpx.post(server["http"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        assert got["token_ids"] == list(local[kind].token_ids) and got["text"] == local[kind].text, kind
        assert got["finish_reason"] == local[kind].finish_reason == "stop", kind
    with Client(server["grpc"]) as c:
        for kind, field in (("json", {"json_schema": schema}), ("regex", {"regex": r"[a-z]{3} \d"}),
                            ("choice", {"choice": ["Paris", "Lyon"]})):
            replies = list(c.generate(p, temperature=0.0, max_tokens=n, **field))
            assert [t for r in replies for t in r.token_ids] == list(local[kind].token_ids), kind
        with pytest.raises(grpc.RpcError) as refused:
            list(c.generate(p, max_tokens=4, regex="(a"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not compile" in refused.value.details()
    # chat, streamed and not: the same JSON object
    chat = {"messages": [{"role": "user", "content": "a JSON object"}], "temperature": 0.0, "max_tokens": n,
            "response_format": {"type": "json_object"}}
    whole = oai.chat.completions.create(model=server["model"], **chat)
    streamed = oai.chat.completions.create(model=server["model"], stream=True, **chat)
    assert "".join(e.choices[0].delta.content or "" for e in streamed if e.choices) == whole.choices[0].message.content
    assert whole.choices[0].message.content.startswith("{")
    # what cannot be served is a 400 naming the reason, streamed or not; then the server goes on
    nope = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "nope"}}}
    for bad, why in (({"response_format": nope}, "Unsupported type"),
                     ({"structured_outputs": {"regex": "(a"}}, "does not compile"),
                     ({"structured_outputs": {"regex": "a", "grammar": "root ::= \"a\""}}, "exactly one"),
                     ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "send one"),
                     ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "send one"),
                     ({"guided_regex": "a", "guided_choice": ["a"]}, "send one of guided_json"),
                     ({"response_format": {"type": "json_schema"}}, "needs its json_schema"),
                     ({"structured_outputs": {"choice": []}}, "1 to 1024 strings"),
                     ({"structured_outputs": {"regex": "a"}, "min_tokens": 2}, "min_tokens cannot be combined")):
        for stream in (False, True):
            r = httpx.post(server["http"] + "/v1/completions", json={"prompt": p, "stream": stream, **bad}, timeout=60)
            assert r.status_code == 400 and why in r.json()["error"]["message"], (bad, r.text)
    # a structure the request's own filters rule out: the client's 400, greedy (the engine's grammar check)
    # and sampled (the shard's sampler), not a server error
    tok = llm.get_tokenizer()
    other = next(t for t in range(5, 500) if tok.decode([t]).strip() and not "Paris".startswith(tok.decode([t])))
    for temperature in (0.0, 1.0):
        body = {"prompt": p, "temperature": temperature, "max_tokens": 4, "structured_outputs": {"choice": ["Paris"]},
                "allowed_token_ids": [other]}
        r = httpx.post(server["http"] + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "leave no token to choose" in r.json()["error"]["message"], r.text
    body = {"prompt": p, "temperature": 0.0, "max_tokens": n, "return_token_ids": True, **bodies["choice"]}
    assert httpx.post(server["http"] + "/v1/completions", json=body, timeout=60).json()["choices"][0][
        "token_ids"] == list(local["choice"].token_ids)


def test_tool_calls_over_http_are_the_engines_held_replies(server, oai, model_path):
    """Chat with tools through the TP=2 app: a named function's call and required calls are the
    single-process engine's replies held to the tools' schemas (aptray.serve.tools), as tool_calls
    with finish_reason tool_calls, streamed (arguments piece by piece, or whole at the end) and not;
    tool_choice auto is refused, and tool messages go to the template."""
    from aptray.serve.openai_api import ChatCompletionRequest
    from aptray.serve.tools import plan
    from aptray.structured_output import StructuredOutput
    from test_tools import ADD, NOW, WEATHER

    llm = LLM(model_path, num_cache_blocks=64)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]

    def local(tools, choice, **sampling):
        req = ChatCompletionRequest(messages=messages, tools=tools, tool_choice=choice)
        _, held = plan(req.tools, req.tool_choice)
        text = llm.tokenizer.apply_chat_template(messages, tools=[t.model_dump(exclude_none=True) for t in req.tools],
                                                 tokenize=False, add_generation_prompt=True)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        return llm.generate({"prompt_token_ids": ids}, SamplingParams(
            max_tokens=120, structured_output=StructuredOutput(**held), **sampling))[0].outputs[0]

    named = {"type": "function", "function": {"name": "add"}}
    want = local([WEATHER, ADD], named, temperature=0.0)
    assert want.finish_reason == "stop"
    kw = dict(model=server["model"], messages=messages, tools=[WEATHER, ADD], tool_choice=named, temperature=0.0,
              max_tokens=120)
    whole = oai.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [("add", want.text)]
    pieces = [e.choices[0] for e in oai.chat.completions.create(stream=True, **kw) if e.choices]
    calls = [c for p in pieces if p.delta.tool_calls for c in p.delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "add"
    assert "".join(c.function.arguments for c in calls) == want.text and len(calls) > 1
    assert pieces[-1].finish_reason == "tool_calls"
    # required: a seed whose held reply ends (a random model may go on adding calls)
    seed, want = next((s, out) for s in range(20) if (out := local([WEATHER, ADD, NOW], "required", temperature=1.0,
                                                                    seed=s)).finish_reason == "stop")
    kw = dict(model=server["model"], messages=messages, tools=[WEATHER, ADD, NOW], tool_choice="required",
              temperature=1.0, seed=seed, max_tokens=120)
    whole = oai.chat.completions.create(**kw).choices[0]
    expected = [(c["name"], c["parameters"]) for c in json.loads(want.text)]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == expected
    last = [e.choices[0] for e in oai.chat.completions.create(stream=True, **kw) if e.choices][-1]
    assert last.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in last.delta.tool_calls] == expected
    # refusals; a tool's answer in the conversation goes to the template
    url = server["http"] + "/v1/chat/completions"
    for extra, why in (({"tools": [ADD]}, "tool_choice auto needs a parser"),
                       ({"tools": [ADD], "tool_choice": named, "response_format": {"type": "json_object"}},
                        "send no response_format"),
                       ({"tool_choice": "required"}, "needs tools")):
        r = httpx.post(url, json={"messages": messages, "max_tokens": 4, **extra}, timeout=60)
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
    turns = messages + [{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "add", "arguments": '{"a": 2, "b": 3}'}}]}, {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    r = httpx.post(url, json={"messages": turns, "tools": [ADD], "tool_choice": "none", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_echo_with_logprobs_scores_the_prompt_as_the_engine_does(server, oai, model_path, reference):
    """echo + logprobs (what lm-evaluation-harness sends to score a text): the prompt's tokens come first,
    the first with null, each then with the engine's prompt log-probability; streamed, the prompt is
    the first event. gRPC's prompt_logprobs likewise, in its first message, with each token's rank."""
    from aptray.client import Client

    tokenizer, _ = reference
    p = PROMPTS[2]
    ids = tokenizer.encode(p)
    local = LLM(model_path, num_cache_blocks=64).generate(p, SamplingParams(
        temperature=0.0, max_tokens=2, ignore_eos=True, logprobs=2, prompt_logprobs=2))[0]
    want = [None] + [lp.logprob for lp in local.prompt_logprobs[1:]] + [lp.logprob for lp in local.outputs[0].logprobs]
    texts = [tokenizer.decode([t]) for t in ids + list(local.outputs[0].token_ids)]

    for max_tokens in (1, 2):  # one token: the request ends with its first chunk
        choice = oai.completions.create(model=server["model"], prompt=p, echo=True, logprobs=2, temperature=0.0,
                                        max_tokens=max_tokens, extra_body={"ignore_eos": True}).choices[0]
        n = len(ids) + max_tokens
        assert choice.text == p + tokenizer.decode(local.outputs[0].token_ids[:max_tokens], skip_special_tokens=True)
        lps = choice.logprobs
        assert lps.tokens == texts[:n] and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        assert lps.token_logprobs[1:] == pytest.approx(want[1:n], abs=1e-4)
        assert lps.text_offset == [sum(map(len, texts[:i])) for i in range(n)]
    # lm-evaluation-harness's loglikelihood request (local-completions, token ids), parsed as it does: the
    # continuation's (here the prompt's last 3 tokens) log-probability and whether each token was the top one
    harness = {"model": server["model"], "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1,
               "seed": 1234, "echo": True}
    choice = httpx.post(server["http"] + "/v1/completions", json=harness, timeout=60).json()["choices"][0]
    ctxlen = len(ids) - 3
    scored = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    assert sum(scored) == pytest.approx(sum(want[ctxlen:len(ids)]), abs=1e-3)
    top1 = [lp.top[0][0] for lp in local.prompt_logprobs[ctxlen:]]
    is_greedy = [t == max(top.values()) for t, top in zip(scored, choice["logprobs"]["top_logprobs"][ctxlen:-1])]
    assert is_greedy == [want_id == got for want_id, got in zip(top1, ids[ctxlen:])]
    body = {"prompt": ids, "echo": True, "logprobs": 2, "temperature": 0.0, "max_tokens": 2, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server["http"] + "/v1/completions", json=body, timeout=60) as r:
        choices = [o["choices"][0] for o in _sse_objects(r)]
    assert choices[0]["text"] == tokenizer.decode(ids)  # token ids echo as their text
    assert choices[0]["logprobs"]["tokens"] == texts[:len(ids)]
    assert [v for c in choices for v in c["logprobs"]["token_logprobs"]][1:] == pytest.approx(want[1:], abs=1e-4)

    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2))
        first = replies[0].prompt_logprobs
        assert len(first) == len(ids) and not first[0].HasField("logprob")
        assert [lp.logprob for lp in first[1:]] == pytest.approx(want[1:len(ids)], abs=1e-4)
        assert all(len(lp.top_ids) == 2 for lp in first[1:]) and not any(r.prompt_logprobs for r in replies[1:])
        assert [lp.rank for lp in first[1:]] == [lp.rank for lp in local.prompt_logprobs[1:]]
        assert not any(r.logprobs for r in replies)


def test_prompt_logprobs_are_the_engines_in_vllms_shape(server, model_path, reference):
    """prompt_logprobs (vLLM's): per prompt token, null for the first, then by token id its log-probability,
    rank and text, for the token itself and the k most likely; on a completion's choices, and on a
    chat's response (its template's prompt). With echo + logprobs of another k, each shows its own k.
    Streamed: 400."""
    tokenizer, _ = reference
    llm = LLM(model_path, num_cache_blocks=64)

    def check(got: list, ids: list[int], k: int) -> None:
        want = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=k))[0]
        assert len(got) == len(ids) and got[0] is None
        for token, entry, lp in zip(ids[1:], got[1:], want.prompt_logprobs[1:]):
            top = {str(i): (v, r, tokenizer.decode([i])) for r, (i, v) in enumerate(lp.top, 1)}
            top.setdefault(str(token), (lp.logprob, lp.rank, tokenizer.decode([token])))
            assert set(entry) == set(top) and lp.rank >= 1
            for i, (value, rank, text) in top.items():
                assert entry[i]["logprob"] == pytest.approx(value, abs=1e-4)
                assert (entry[i]["rank"], entry[i]["decoded_token"]) == (rank, text)

    body = {"prompt": PROMPTS[2], "max_tokens": 2, "prompt_logprobs": 2, "echo": True, "logprobs": 1,
            "return_token_ids": True}
    choice = httpx.post(server["http"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    check(choice["prompt_logprobs"], choice["prompt_token_ids"], 2)
    assert all(top is None or len(top) == 1 for top in choice["logprobs"]["top_logprobs"])  # echo's own k
    chat = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 2, "prompt_logprobs": 0,
            "return_token_ids": True}
    reply = httpx.post(server["http"] + "/v1/chat/completions", json=chat, timeout=60).json()
    check(reply["prompt_logprobs"], reply["prompt_token_ids"], 0)
    plain = httpx.post(server["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=60)
    assert "prompt_logprobs" not in plain.json()["choices"][0]
    for path, request in (("/v1/completions", body), ("/v1/chat/completions", chat)):
        r = httpx.post(server["http"] + path, json={**request, "stream": True}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text


def test_tokenize_and_detokenize_are_the_tokenizers(server, reference):
    """vLLM's /tokenize: a prompt's ids are the tokenizer's (with or without its special tokens, and
    their strings where asked); a conversation's are the ones a chat request of it is served on.
    /detokenize gives the ids' text back. A text may be as long as a prompt to truncate (4 longest
    prompts), not longer."""
    tokenizer, _ = reference
    url = server["http"]
    context = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["max_model_len"]
    for add in (True, False):
        r = httpx.post(url + "/tokenize", json={"prompt": PROMPTS[0], "add_special_tokens": add,
                                                "return_token_strs": True}, timeout=60).json()
        ids = tokenizer.encode(PROMPTS[0], add_special_tokens=add)
        assert (r["tokens"], r["count"], r["token_strs"]) == (ids, len(ids), tokenizer.convert_ids_to_tokens(ids))
        assert r["max_model_len"] == context
    messages = [{"role": "user", "content": PROMPTS[1]}]
    r = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=60).json()
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1,
                                                          "return_token_ids": True}, timeout=60).json()
    assert r["tokens"] == chat["prompt_token_ids"] and "token_strs" not in r
    back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}, timeout=60).json()
    assert back["prompt"] == tokenizer.decode(r["tokens"])
    limit = (context - 1) * 32 * 4  # limits.MAX_CHARS_PER_TOKEN, TRUNCATED_PROMPT_FACTOR
    assert httpx.post(url + "/tokenize", json={"prompt": "x" * limit}, timeout=60).status_code == 200
    r = httpx.post(url + "/tokenize", json={"prompt": "x" * (limit + 1)}, timeout=60)
    assert r.status_code == 400 and f"over the limit of {limit}" in r.json()["error"]["message"], r.text


def test_n_choices_are_separate_draws_relayed_as_one_response(server, model_path):
    """n = 3, seeded: choice i is the engine's output with seed + i, streamed or not, completion or
    chat, HTTP or gRPC; usage sums the choices; a streamed response interleaves the choices by index. n over 4 with
    a queue of 4 is refused (429) and leaves nothing running."""
    p, url = PROMPTS[1], server["http"] + "/v1"
    llm = LLM(model_path, num_cache_blocks=64)
    want = [list(llm.generate(p, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=MAX_TOKENS,
                                                 ignore_eos=True))[0].outputs[0].token_ids) for i in range(3)]
    assert len({tuple(w) for w in want}) == 3
    body = {"prompt": p, "n": 3, "temperature": 1.0, "seed": 7, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(url + "/completions", json=body, timeout=60).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in whole["choices"]] == want
    assert whole["usage"]["completion_tokens"] == 3 * MAX_TOKENS
    with httpx.stream("POST", url + "/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = _sse_objects(r)
    streamed = [[t for e in events for c in e["choices"] if c["index"] == i for t in c["token_ids"]] for i in range(3)]
    assert streamed == want
    assert [e["usage"]["completion_tokens"] for e in events if e.get("usage")] == [3 * MAX_TOKENS]
    chat_body = {"messages": [{"role": "user", "content": p}], "n": 2, "temperature": 1.0, "seed": 7,
                 "max_tokens": 4, "ignore_eos": True}
    chat = httpx.post(url + "/chat/completions", json=chat_body, timeout=60).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1] and chat["usage"]["completion_tokens"] == 8
    with httpx.stream("POST", url + "/chat/completions", json={**chat_body, "stream": True}, timeout=60) as r:
        events = _sse_objects(r)
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role") == "assistant"]
    text = ["".join(c["delta"]["content"] or "" for e in events for c in e["choices"] if c["index"] == i)
            for i in range(2)]
    assert roles == [0, 1] and text == [c["message"]["content"] for c in chat["choices"]]
    # gRPC: the same draws, each choice's messages tagged with its index and its own request id
    from aptray.client import Client
    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, n=3, temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [[t for r in replies if r.index == i for t in r.token_ids] for i in range(3)] == want
    finals = sorted((r.index, r.request_id, r.usage.completion_tokens) for r in replies if r.finished)
    assert [(i, n) for i, _, n in finals] == [(0, MAX_TOKENS), (1, MAX_TOKENS), (2, MAX_TOKENS)]
    assert len({rid for _, rid, _ in finals}) == 3

    too_many = httpx.post(url + "/completions", json={"prompt": p, "n": 12, "max_tokens": SLOW}, timeout=60)
    assert too_many.status_code == 429, too_many.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h = httpx.get(server["http"] + "/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.2)
    assert h["running"] == 0 and h["waiting"] == 0, h  # the admitted choices were aborted


def test_a_completion_of_several_prompts_answers_each(server, model_path):
    """prompt as a list of strings or of token-id lists: choice i is prompt i // n's choice i % n, the
    engine's greedy output for that prompt, streamed or not; echo and prompt_token_ids are each
    choice's own prompt; usage counts every prompt once. Past the server's limits: 400."""
    url = server["http"] + "/v1/completions"
    llm = LLM(model_path, num_cache_blocks=64)
    prompts = PROMPTS[:2]
    want = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    body = {"prompt": prompts, "n": 2, "temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "return_token_ids": True, "echo": True}
    whole = httpx.post(url, json=body, timeout=60).json()
    got = whole["choices"]
    assert [c["index"] for c in got] == [0, 1, 2, 3]
    assert [c["token_ids"] for c in got] == [want[0], want[0], want[1], want[1]]
    assert [c["prompt_token_ids"] for c in got] == [ids[0], ids[0], ids[1], ids[1]]
    assert [c["text"][:len(prompts[i // 2])] for i, c in enumerate(got)] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert whole["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert whole["usage"]["completion_tokens"] == 4 * MAX_TOKENS
    streamed = {"prompt": ids, "temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                "return_token_ids": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=streamed, timeout=60) as r:
        events = _sse_objects(r)
    assert [[t for e in events for c in e["choices"] if c["index"] == i for t in c["token_ids"]]
            for i in range(2)] == want
    assert [e["usage"]["prompt_tokens"] for e in events if e.get("usage")] == [len(ids[0]) + len(ids[1])]
    for too_many in ({"prompt": ["a"] * 33}, {"prompt": ["a"] * 8, "n": 9}):
        r = httpx.post(url, json={**too_many, "max_tokens": 1}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def _sse_objects(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_return_token_ids_gives_the_prompts_and_replys_ids(server, reference):
    """return_token_ids (vLLM's name): the reply's ids are the engine's greedy ids, streamed or not,
    completion or chat; the prompt's ids come once; without it no response carries either field."""
    tokenizer, ref = reference
    p, url = PROMPTS[0], server["http"] + "/v1"
    body = {"prompt": p, "temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True, "return_token_ids": True}
    whole = httpx.post(url + "/completions", json=body, timeout=60).json()["choices"][0]
    assert whole["token_ids"] == ref[p][0] and whole["prompt_token_ids"] == tokenizer.encode(p)
    with httpx.stream("POST", url + "/completions", json={**body, "stream": True}, timeout=60) as r:
        choices = [o["choices"][0] for o in _sse_objects(r)]
    assert [t for c in choices for t in c["token_ids"]] == ref[p][0]
    assert "".join(c["text"] for c in choices) == ref[p][1]
    assert [c.get("prompt_token_ids") for c in choices] == [tokenizer.encode(p)] + [None] * (len(choices) - 1)

    chat = {"messages": [{"role": "user", "content": p}], "temperature": 0.0, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "return_token_ids": True}
    whole = httpx.post(url + "/chat/completions", json=chat, timeout=60).json()
    assert len(whole["choices"][0]["token_ids"]) == MAX_TOKENS
    assert tokenizer.decode(whole["choices"][0]["token_ids"]) == whole["choices"][0]["message"]["content"]
    with httpx.stream("POST", url + "/chat/completions", json={**chat, "stream": True}, timeout=60) as r:
        events = _sse_objects(r)
    assert events[0]["prompt_token_ids"] == whole["prompt_token_ids"] and len(whole["prompt_token_ids"]) > 5
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == whole["choices"][0]["token_ids"]

    plain = httpx.post(url + "/completions", json={**body, "return_token_ids": False}, timeout=60).text
    with httpx.stream("POST", url + "/chat/completions", json={**chat, "return_token_ids": False, "stream": True},
                      timeout=60) as r:
        plain += "".join(r.iter_lines())
    assert "token_ids" not in plain and '"text":' in plain and '"content":' in plain


def test_seeded_sampling_is_reproducible(server, oai):
    kw = dict(model=server["model"], prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9,
              seed=1234, extra_body={"ignore_eos": True})
    assert oai.completions.create(**kw).choices[0].text == oai.completions.create(**kw).choices[0].text


def test_grpc_client_sync_and_async(server, reference):
    from aptray.client import AsyncClient, Client

    tokenizer, ref = reference
    p = PROMPTS[1]
    with Client(server["grpc"]) as c:
        replies = list(c.generate(p, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, ttft_ms=5000))
        assert c.health().ok
    assert [t for r in replies for t in r.token_ids] == ref[p][0]
    assert replies[-1].finished and replies[-1].usage.completion_tokens == MAX_TOKENS

    async def run():
        async with AsyncClient(server["grpc"]) as c:
            return [t async for r in c.generate(tokenizer.encode(p), temperature=0.0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True) for t in r.token_ids]
    assert asyncio.run(run()) == ref[p][0]


def test_loadgen_replays_a_trace_over_grpc_and_http(server):
    """loadgen's remote clients (python -m loadgen run --grpc / --url) on a real gRPC channel and
    real HTTP: every request finishes with all its tokens, one time per token, and the SLO metrics
    are computed from them."""
    from loadgen.clients import GrpcStreamClient, HttpStreamClient
    from loadgen.metrics import summarize
    from loadgen.traces import TraceRequest

    trace = [TraceRequest(f"lg{i}", 0.2 * i, 5 + i, 6) for i in range(3)]  # lengths only: token-id prompts
    for client in (GrpcStreamClient(server["grpc"], 60.0, 60.0), HttpStreamClient(server["http"], 60.0, 60.0)):
        res = client.run(trace)
        assert [r.status for r in res.records] == ["finished"] * 3, type(client).__name__
        assert [r.num_tokens for r in res.records] == [6] * 3, type(client).__name__
        assert all(0 < r.ttft < 60 and len(r.token_gaps) == 5 for r in res.records)
        assert summarize(res.records, res.duration)["attainment"] == 1.0
        if isinstance(client, HttpStreamClient):  # the replica that answered (x-aptray-replica); one here
            assert len({r.replica for r in res.records}) == 1 and res.records[0].replica


def test_loadgen_clients_keep_the_servers_message_for_a_refused_request(server):
    """A prompt over the context (511 prompt tokens at most) is refused (HTTP 400, gRPC INVALID_ARGUMENT); the record
    says why, and the run's summary counts it by message."""
    from loadgen.clients import GrpcStreamClient, HttpStreamClient
    from loadgen.metrics import summarize
    from loadgen.traces import TraceRequest

    trace = [TraceRequest("ok", 0.0, 8, 3), TraceRequest("long", 0.1, 600, 3)]
    for client, prefix in ((GrpcStreamClient(server["grpc"], 60.0, 60.0), "INVALID_ARGUMENT: "),
                           (HttpStreamClient(server["http"], 60.0, 60.0), "HTTP 400: ")):
        res = client.run(trace)
        ok, long = sorted(res.records, key=lambda r: r.request_id != "ok")
        assert ok.status == "finished" and not ok.error
        assert long.status == "failed" and long.error.startswith(prefix) and "600 tokens" in long.error, long.error
        errors = summarize(res.records, res.duration)["errors"]
        assert list(errors.values()) == [1] and list(errors)[0].startswith("failed: " + prefix), errors


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_loadgen_multiturn_resends_the_reply_the_server_gave(server, transport):
    """A conversation's second turn resends the first (closed loop) with the reply's token ids the
    server gave (gRPC streams them; over HTTP the turn asks for them with return_token_ids), as a
    chat client does: turn 1 hits the blocks of turn 0's prompt and reply (40 + 24 tokens, 63
    computed: 3 full blocks of 16), where resending the stream's ids would hit the prompt's 2. The
    run's hit rate comes from the server's /metrics."""
    from loadgen.clients import GrpcStreamClient, HttpStreamClient
    from loadgen.samples import Sample
    from loadgen.metrics import summarize
    from loadgen.traces import make_trace

    samples = [Sample("", 40, 24, conversation="c", turn=0), Sample("", 72, 4, conversation="c", turn=1)]
    trace = make_trace(samples, rate=1.0, think_time=0.1)
    client = (GrpcStreamClient(server["grpc"], 60.0, 60.0, metrics_url=server["http"] + "/metrics")
              if transport == "grpc" else HttpStreamClient(server["http"], 60.0, 60.0))
    res = client.run(trace)
    assert [r.status for r in res.records] == ["finished"] * 2
    assert res.records[1].arrived_at >= res.records[0].finished_at
    hits = summarize(res.records, res.duration, stats=res.info["scheduler_stats"])["prefix_cache"]
    assert hits["queried_tokens"] >= 112 and hits["hit_tokens"] == 48, hits


def test_grpc_rejects_with_status(server):
    import grpc

    from aptray.client import Client
    with Client(server["grpc"]) as c, pytest.raises(grpc.RpcError) as e:
        list(c.generate("hi", max_tokens=100_000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()


def test_bad_requests(server):
    url = server["http"] + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = httpx.post(url, json={"prompt": "hello", "max_tokens": 600})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert "512" in r.json()["error"]["message"]
    r = httpx.post(url, json={"prompt": "hello", "model": "nope"})
    assert r.status_code == 404


def _metric(server, name, labels=""):
    text = httpx.get(server["http"] + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return None


def test_metrics_after_traffic(server):
    text = httpx.get(server["http"] + "/metrics").text
    assert "aptray_ttft_seconds_bucket" in text and "aptray_tbt_seconds_bucket" in text
    assert _metric(server, "aptray_ttft_seconds_count") >= 5
    assert _metric(server, "aptray_scheduler_seconds_count") > 0
    assert _metric(server, "aptray_slo_attained_total") >= 1
    assert _metric(server, "aptray_prefix_cache_queried_tokens_total") > 0
    assert _metric(server, "aptray_store_write_seconds_count") > 0


def test_redis_holds_in_flight_and_expires_finished(server):
    from aptray.serve.store import RequestStore

    store = RequestStore.connect(f"unix://{server['redis'].socket_file}")
    with httpx.stream("POST", server["http"] + "/v1/completions", timeout=60,
                      json={"prompt": "hello", "max_tokens": SLOW, "ignore_eos": True, "stream": True,
                            "aptray_slo": {"ttft_ms": 3000, "tbt_ms": 700}}) as r:
        lines = r.iter_lines()
        rid = json.loads(next(l for l in lines if l.startswith("data:"))[5:])["id"]
        meta = store.get(rid)
        assert meta is not None and meta.prompt_len > 0 and (meta.ttft_slo, meta.tbt_slo) == (3.0, 0.7)
        assert rid in [m.request_id for m in store.unfinished_everywhere()]
        for line in lines:
            pass
    deadline = time.time() + 10
    while store.get(rid) is not None and store.get(rid).status not in ("length", "stop"):
        time.sleep(0.05)
    done = store.get(rid)
    assert done.status == "length" and len(done.output_token_ids) == SLOW
    assert rid not in [m.request_id for m in store.unfinished_everywhere()]
    while store.get(rid) is not None and time.time() < deadline:
        time.sleep(0.2)
    assert store.get(rid) is None


def test_overload_gets_429_with_retry_after(server):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            # long requests: none finishes while the burst arrives, so 4 run, 4 queue and the rest are refused
            body = {"prompt": "hello", "max_tokens": 300, "ignore_eos": True}
            return await asyncio.gather(*[c.post(server["http"] + "/v1/completions", json=body) for _ in range(16)])
    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    r429 = next(r for r in responses if r.status_code == 429)
    assert r429.headers["retry-after"] == "1" and r429.json()["error"]["type"] == "rate_limit_error"
    assert _metric(server, "aptray_requests_rejected_total", '{reason="queue_full"}') >= 1


def _wait_idle_blocks(server, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _metric(server, "aptray_cache_blocks_in_use", '{kind="kv"}') == 0:
            return True
        time.sleep(0.1)
    return False


def _ended_counts(server) -> tuple[float, float]:
    """(requests ended by an abort, requests ended at all) on /metrics: every request that ends counts
    once, as attained or as missed with its reason."""
    text = httpx.get(server["http"] + "/metrics").text
    aborted = ended = 0.0
    for line in text.splitlines():
        if line.startswith(("aptray_slo_attained_total ", "aptray_slo_missed_total{")):
            count = float(line.split()[-1])
            ended += count
            aborted += count if 'reason="abort"' in line else 0.0
    return aborted, ended


def _cut_short(server, cut_short) -> str:
    """What became of a request the client cuts short (cut_short()): "aborted" (the cancel reached the
    router before its last token) or "finished" (counted as ended for another reason: its last token
    came first, the cancel was too late). Every block is freed after, whichever it was; a request that
    ends uncounted, or counted twice, fails here."""
    assert _wait_idle_blocks(server, timeout=30)
    aborted_before, ended_before = _ended_counts(server)
    cut_short()
    assert _wait_idle_blocks(server, timeout=30)
    deadline = time.time() + 10  # the count follows the blocks' release within the same step
    while time.time() < deadline:
        aborted, ended = _ended_counts(server)
        if ended > ended_before:
            break
        time.sleep(0.1)
    assert ended - ended_before == 1, f"one request ended, counted {ended - ended_before} times"
    return "aborted" if aborted == aborted_before + 1 else "finished"


def _aborts(server, cut_short) -> None:
    """The cut-short request is aborted. Serve's proxies pass a disconnect or cancel on to the replica
    asynchronously and the tiny model makes its 480 tokens in about a second, so on a loaded 2-core
    machine the last token can come first: then the request finished, and a second try must abort. A
    request that ends uncounted fails at once."""
    outcome = _cut_short(server, cut_short)
    if outcome == "finished":
        outcome = _cut_short(server, cut_short)
    assert outcome == "aborted"


def test_client_disconnect_aborts_and_frees_blocks(server):
    def disconnect_after_three_events():
        with httpx.stream("POST", server["http"] + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(l for l in lines if l.startswith("data:"))
            assert _metric(server, "aptray_cache_blocks_in_use", '{kind="kv"}') > 0
        # leaving the with-block closes the connection mid-stream
    _aborts(server, disconnect_after_three_events)


def test_a_client_leaving_a_responses_stream_aborts_it(server):
    """The Responses API's stream, left after its first delta: the request is aborted and its blocks freed."""
    def leave_after_the_first_delta():
        with httpx.stream("POST", server["http"] + "/v1/responses", timeout=60,
                          json={"input": "hello", "max_output_tokens": 480, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line == "event: response.output_text.delta")
            assert _metric(server, "aptray_cache_blocks_in_use", '{kind="kv"}') > 0
    _aborts(server, leave_after_the_first_delta)


def test_a_client_leaving_an_n_choice_stream_aborts_every_choice(server):
    """n = 3: the client reads three events and leaves; each choice's request ends once, as an abort
    (a second try where one finished first, as in _aborts), and every block is freed."""
    aborted = ended = 0.0
    for _ in range(2):
        assert _wait_idle_blocks(server, timeout=30)
        aborted_before, ended_before = _ended_counts(server)
        with httpx.stream("POST", server["http"] + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "n": 3, "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(line for line in lines if line.startswith("data:"))
        assert _wait_idle_blocks(server, timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and _ended_counts(server)[1] < ended_before + 3:
            time.sleep(0.1)
        aborted, ended = _ended_counts(server)
        assert ended - ended_before == 3, f"three requests ended, counted {ended - ended_before} times"
        if aborted - aborted_before == 3:
            break
    assert aborted - aborted_before == 3


def test_grpc_cancel_aborts(server):
    from aptray.client import Client

    def cancel_after_the_first_token():
        with Client(server["grpc"]) as c:
            call = c.generate_call("hello", max_tokens=480, ignore_eos=True)
            next(call)
            call.cancel()
    _aborts(server, cancel_after_the_first_token)


# -- TP=1: the model in the router process ----------------------------------------------------------
@pytest.fixture(scope="module")
def server_tp1(server, redis_server):
    """A second app beside the TP=2 one: TP=1, executor auto, so no shard actors and no gRPC per step;
    chat's tool_choice auto reads hermes tool calls."""
    from aptray.app import build_app

    args = {"tensor_parallel_size": 1, "num_cache_blocks": 128, "max_num_seqs": 4, "use_gpu": False,
            "redis_url": f"unix://{redis_server.socket_file}", "tool_call_parser": "hermes"}
    serve.run(build_app(args), name="aptray-tp1", route_prefix="/tp1")
    yield {"http": server["http"] + "/tp1", "grpc": server["grpc"], "model": server["model"]}
    serve.delete("aptray-tp1")


def test_tp1_in_the_router_matches_the_engine_token_for_token(server_tp1, reference):
    from aptray.client import Client

    tokenizer, ref = reference
    assert httpx.get(server_tp1["http"] + "/health").json()["executor"] == "local"
    assert httpx.get(server_tp1["http"].removesuffix("/tp1") + "/health").json()["executor"] == "ray"
    oai = openai.OpenAI(base_url=server_tp1["http"] + "/v1", api_key="unused", max_retries=0)
    for p in PROMPTS:
        whole = oai.completions.create(model=server_tp1["model"], prompt=p, **GREEDY)
        pieces = [c.choices[0].text for c in oai.completions.create(model=server_tp1["model"], prompt=p, stream=True,
                                                                     **GREEDY) if c.choices]
        assert whole.choices[0].text == "".join(pieces) == ref[p][1]
        assert len(pieces) == MAX_TOKENS  # one SSE event per token, however the writes are grouped
    with Client(server_tp1["grpc"], application="aptray-tp1") as c:
        for p in PROMPTS:
            replies = list(c.generate(tokenizer.encode(p), temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
            assert [t for r in replies for t in r.token_ids] == ref[p][0]
            assert "".join(r.text for r in replies) == ref[p][1]


def test_tp1_stop_string_streamed_as_whole(server_tp1, reference):
    """A stop string that does occur: the stream holds back what could become it and ends at the
    same cut as the non-streamed answer."""
    _, ref = reference
    p = PROMPTS[0]
    text = ref[p][1]
    stop = next(text[i:i + 3] for i in range(3, len(text) - 3) if text[i:i + 3].strip())
    want = text[:text.find(stop)]
    oai = openai.OpenAI(base_url=server_tp1["http"] + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=server_tp1["model"], prompt=p, stop=[stop], **GREEDY)
    whole = oai.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kw) if c.choices)
    assert whole.text == streamed == want and whole.finish_reason == "stop"


def test_graceful_drain_finishes_in_flight_then_frees_shards(server):
    """Deleting the app lets a running stream finish, then the router releases shards and their group.
    Runs last: it takes the app down."""
    import threading

    from ray.util import placement_group_table

    result = {}

    def stream():
        with httpx.stream("POST", server["http"] + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 150, "ignore_eos": True, "stream": True}) as r:
            result["chunks"] = [l for l in r.iter_lines() if l.startswith("data:")]

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    serve.delete("aptray")
    t.join(60)
    assert result["chunks"][-1] == "data: [DONE]"
    assert json.loads(result["chunks"][-2][5:])["choices"][0]["finish_reason"] == "length"
    deadline = time.time() + 15
    while time.time() < deadline:
        if all(pg["state"] == "REMOVED" for pg in placement_group_table().values()):
            break
        time.sleep(0.2)
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())


def test_tool_choice_auto_reads_the_models_hermes_calls(server_tp1, model_path):
    """With tool_call_parser hermes, tool_choice auto (OpenAI's default with tools) returns the text
    before the model's <tool_call> blocks as content and the blocks as tool_calls, streamed and not.
    The tiny model writes such blocks only when a regex (structured_outputs) makes it: its reply is
    the engine's under the same regex."""
    from aptray.structured_output import StructuredOutput
    from test_tools import ADD

    regex = r'Sure\. <tool_call>\n\{"name": "add", "arguments": \{"a": [0-9], "b": [0-9]\}\}\n</tool_call>'
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    llm = LLM(model_path, num_cache_blocks=64)
    text = llm.tokenizer.apply_chat_template(messages, tools=[ADD], tokenize=False, add_generation_prompt=True)
    want = llm.generate({"prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)}, SamplingParams(
        temperature=0.0, max_tokens=80, structured_output=StructuredOutput("regex", regex)))[0].outputs[0]
    assert want.finish_reason == "stop"
    arguments = json.loads(want.text.split("\n")[1])["arguments"]
    body = {"messages": messages, "tools": [ADD], "temperature": 0.0, "max_tokens": 80,
            "structured_outputs": {"regex": regex}}
    url = server_tp1["http"] + "/v1/chat/completions"
    choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure. "
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("add", arguments)]
    with httpx.stream("POST", url, json={**body, "stream": True, "tool_choice": "auto"}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure. "
    streamed = [c for d in deltas for c in d.get("tool_calls") or []]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == [("add", arguments)]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = httpx.post(url, json={"messages": messages, "tools": [ADD], "max_tokens": 6}, timeout=60).json()
    assert plain["choices"][0]["message"]["content"] and "tool_calls" not in plain["choices"][0]["message"]
    # parallel_tool_calls false: of the two calls the model makes, the first
    two = regex.replace("Sure\\. ", "") * 2
    want = llm.generate({"prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)}, SamplingParams(
        temperature=0.0, max_tokens=240, structured_output=StructuredOutput("regex", two)))[0].outputs[0]
    assert want.finish_reason == "stop" and want.text.count("<tool_call>") == 2
    body = {**body, "max_tokens": 240, "structured_outputs": {"regex": two}, "parallel_tool_calls": False}
    calls = httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("add", json.dumps(json.loads(want.text.split("\n")[1])["arguments"]))]
