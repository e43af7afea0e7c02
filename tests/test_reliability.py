"""One fault of each kind on the served app (real Ray, real gRPC, a real restartable redis-server):
a shard process killed mid-generation, the router process killed mid-generation, Redis
restarted (empty) under load. Every request must complete with the greedy output of a
fault-free run, or end with an explicit error; none may be lost or hang.

One Ray instance and one app for the module. Figures for docs/RELIABILITY.md are printed as
`RELIABILITY ...` lines (pytest -s).
"""
import asyncio
import os
import signal
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import httpx

from aptray.llm import LLM  # noqa: E402
from aptray.sampling_params import SamplingParams  # noqa: E402
from aptray.model.demo import demo_model_dir, ensure_demo_model  # noqa: E402
from aptray.worker.shard import free_port  # noqa: E402
from fault_tools import RedisProcess, kill_one, metric, sse_events, worker_stderr  # noqa: E402
from serve_tools import served_app  # noqa: E402

PROMPTS = ["The quick brown fox", "What is the capital of France?", "def add(a, b):", "Once upon a time"]
LONG = 120  # tokens: long enough that a fault lands mid-generation
KEY = "test-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_path():
    return ensure_demo_model(demo_model_dir())


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy outputs of the single-process engine, no faults."""
    llm = LLM(model_path, num_cache_blocks=128)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=LONG, ignore_eos=True))
    return {p: (o.outputs[0].token_ids, o.outputs[0].text) for p, o in zip(PROMPTS, outs)}


@pytest.fixture(scope="module")
def redis_proc():
    r = RedisProcess(free_port())
    r.start()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(model_path, redis_proc):
    args = {"tensor_parallel_size": 2, "num_cache_blocks": 128, "max_num_seqs": 8, "max_queue": 16,
            "redis_url": redis_proc.url, "use_gpu": False, "api_keys": KEY}
    with served_app(args, num_cpus=4) as addresses:
        yield addresses


def _metrics(server) -> str:
    return httpx.get(server["http"] + "/metrics", headers=AUTH, timeout=30).text


def _body(prompt, stream):
    return {"prompt": prompt, "max_tokens": LONG, "temperature": 0.0, "ignore_eos": True, "stream": stream}


async def _stream(c, server, prompt, started: asyncio.Event | None = None):
    """(text, finish_reason or error) of one SSE stream; sets started after a few tokens."""
    text, n = "", 0
    async with c.stream("POST", server["http"] + "/v1/completions", json=_body(prompt, True), headers=AUTH) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            ev = __import__("json").loads(line[5:])
            if "error" in ev:
                return text, ("error", ev["error"]["message"])
            text += ev["choices"][0]["text"]
            n += 1
            if started is not None and n >= 5:
                started.set()
            if ev["choices"][0]["finish_reason"]:
                return text, ev["choices"][0]["finish_reason"]
    return text, ("error", "stream ended without a finish")


async def _whole(c, server, prompt):
    r = await c.post(server["http"] + "/v1/completions", json=_body(prompt, False), headers=AUTH)
    if r.status_code != 200:
        return "", ("error", r.status_code, r.text)
    return r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]


def _grpc(server, prompt, reference):
    from aptray.client import AsyncClient

    async def run():
        async with AsyncClient(server["grpc"], api_key=KEY) as c:
            ids = [t async for r in c.generate(prompt, temperature=0.0, max_tokens=LONG, ignore_eos=True)
                   for t in r.token_ids]
        return ids
    return run()


async def _load_with_fault(server, reference, fault, timeout=240):
    """Two SSE streams, one whole completion, one gRPC stream; fault() once the streams have tokens."""
    started = asyncio.Event()
    async with httpx.AsyncClient(timeout=timeout) as c:
        tasks = [asyncio.create_task(_stream(c, server, PROMPTS[0], started)),
                 asyncio.create_task(_stream(c, server, PROMPTS[1])),
                 asyncio.create_task(_whole(c, server, PROMPTS[2])),
                 asyncio.create_task(_grpc(server, PROMPTS[3], reference))]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.get_running_loop().run_in_executor(None, fault)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    texts = {PROMPTS[i]: results[i] for i in range(3)}
    for p, (text, reason) in texts.items():
        assert reason == "length", (p, reason)
        assert text == reference[p][1], p
    assert results[3] == reference[PROMPTS[3]][0]
    return len(results)


def test_shard_process_killed_mid_generation(server, reference):
    before = metric(_metrics(server), "aptray_shard_rebuilds_total") or 0
    t = time.time()
    n = asyncio.run(_load_with_fault(server, reference, lambda: kill_one("ray::ShardWorker")))
    text = _metrics(server)
    assert metric(text, "aptray_shard_rebuilds_total") == before + 1
    resumed = metric(text, "aptray_requests_resumed_total", '{source="shards"}')
    assert resumed >= 1
    print(f"RELIABILITY shard_kill requests={n} completed_identical={n} lost=0 resumed={resumed:.0f} "
          f"wall_s={time.time() - t:.1f}")


def _live_shard(rank: int):
    """The live shard actor of that rank (RayExecutor names them aptray-shard-<group>-rank<r>)."""
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("aptray-shard-") and a["name"].endswith(f"-rank{rank}"):
            handle = ray.get_actor(a["name"], namespace=a["namespace"])
            try:
                ray.get(handle.node_address.remote(), timeout=5)
                return handle
            except Exception:  # a killed group's actor, still listed
                continue
    raise RuntimeError(f"no live shard of rank {rank}")


def test_exception_on_one_rank_fails_the_step_fast_and_resumes(server, reference):
    """A Python exception on rank 1 mid-generation: rank 1 answers with an error while rank 0 waits in
    a collective. The router fails the step at once (not after the 600 s step timeout), rebuilds the
    group and resumes every request: all finish with the fault-free tokens."""
    before = metric(_metrics(server), "aptray_shard_rebuilds_total") or 0
    t = time.time()
    n = asyncio.run(_load_with_fault(server, reference, lambda: ray.get(_live_shard(1).fail_next_plans.remote(1))))
    wall = time.time() - t
    text = _metrics(server)
    assert metric(text, "aptray_shard_rebuilds_total") == before + 1
    assert wall < 120  # the whole run, rebuild included: nowhere near STEP_TIMEOUT_S
    print(f"RELIABILITY rank_exception requests={n} completed_identical={n} lost=0 wall_s={wall:.1f}")


def test_router_process_killed_mid_generation(server, reference):
    t = time.time()
    n = asyncio.run(_load_with_fault(server, reference, lambda: kill_one("ray::Router")))
    text = _metrics(server)
    assert metric(text, "aptray_router_restarts_total") == 1
    assert httpx.get(server["http"] + "/health", timeout=30).status_code == 200
    resumed = {src: metric(text, "aptray_requests_resumed_total", '{source="%s"}' % src) for src in ("store", "client")}
    print(f"RELIABILITY router_kill requests={n} completed_identical={n} lost=0 resumed={resumed} "
          f"wall_s={time.time() - t:.1f}")


def test_router_crash_after_it_loaded_xgrammar(server, reference):
    """A router that has compiled a structured output (so xgrammar, whose runtime would put in a SIGSEGV
    handler that can hang, is loaded) crashes mid-generation: it dies, by the handler Ray put in
    (aptray.fatal_signals), and is replaced; every request ends with the fault-free tokens."""
    body = {"prompt": "hello", "max_tokens": 4, "response_format": {"type": "json_object"}}
    assert httpx.post(server["http"] + "/v1/completions", json=body, headers=AUTH, timeout=120).status_code == 200
    before = metric(_metrics(server), "aptray_router_restarts_total") or 0
    crashed = []
    n = asyncio.run(_load_with_fault(server, reference,
                                     lambda: crashed.append(kill_one("ray::Router", signum=signal.SIGSEGV))))
    assert metric(_metrics(server), "aptray_router_restarts_total") == before + 1
    log = worker_stderr(crashed[0], until="SIGSEGV received")
    assert "SIGSEGV received" in log and "Segfault encountered" not in log, log[-2000:]  # Ray's, not tvm_ffi's
    print(f"RELIABILITY router_segfault requests={n} completed_identical={n} lost=0")


def test_redis_restart_under_load(server, reference, redis_proc):
    """In-flight streams go on while Redis is away; new requests get a quick 503 JSON error; once Redis
    is back (empty) the router rewrites what is in flight and takes new requests again."""
    from aptray.serve.store import RequestStore

    refused = {}

    def outage():
        redis_proc.stop()
        t = time.time()
        r = httpx.post(server["http"] + "/v1/completions", json=_body("hello", False), headers=AUTH, timeout=30)
        refused.update(status=r.status_code, body=r.json(), seconds=time.time() - t)
        time.sleep(1.0)
        redis_proc.start()

    n = asyncio.run(_load_with_fault(server, reference, outage))
    assert refused["status"] == 503 and refused["body"]["error"]["type"] == "service_unavailable"
    assert "Redis" in refused["body"]["error"]["message"] and refused["seconds"] < 5
    # back: new requests are accepted and recorded, and Redis holds what is in flight
    deadline = time.time() + 20
    while time.time() < deadline:
        r = httpx.post(server["http"] + "/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": "hello", "max_tokens": 4, "temperature": 0.0})
        if r.status_code == 200:
            break
        time.sleep(0.5)
    assert r.status_code == 200
    store = RequestStore.connect(redis_proc.url)
    assert store.r.ping()
    text = _metrics(server)
    assert metric(text, "aptray_store_outages_total") >= 1 and metric(text, "aptray_store_available") == 1
    print(f"RELIABILITY redis_restart requests={n} completed_identical={n} lost=0 "
          f"refused_while_away={refused['status']} in {refused['seconds']:.2f}s")


def test_resync_rewrites_in_flight_after_an_empty_restart(server, redis_proc):
    """A stream that is running across a Redis restart is back in Redis (with its tokens) afterwards."""
    import threading

    from aptray.serve.store import RequestStore

    got = {}

    def stream():
        with httpx.stream("POST", server["http"] + "/v1/completions", headers=AUTH, timeout=120,
                          json={"prompt": "hello", "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
            got["events"] = sse_events(r.iter_lines())

    th = threading.Thread(target=stream)
    th.start()
    time.sleep(1.0)
    redis_proc.stop()
    time.sleep(1.0)
    redis_proc.start()
    store = RequestStore.connect(redis_proc.url)
    deadline = time.time() + 10
    metas = []
    while time.time() < deadline and not metas:
        metas = [m for m in store.unfinished_everywhere() if m.output_token_ids]
        time.sleep(0.2)
    th.join(120)
    assert metas and metas[0].prompt_len > 0
    assert got["events"][-1]["choices"][0]["finish_reason"] == "length"


def _refused(server) -> dict:
    text = _metrics(server)
    return {(api, status): metric(text, "aptray_refused_requests_total", f'{{api="{api}",status="{status}"}}') or 0
            for api, status in (("http", 401), ("http", 422), ("grpc", 401))}


def test_api_key_required(server):
    """No key or a wrong one: 401 (gRPC UNAUTHENTICATED), each counted on /metrics by API and status,
    as is a malformed body's 422."""
    before = _refused(server)
    r = httpx.post(server["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    r = httpx.post(server["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30,
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(server["http"] + "/health", timeout=30).status_code == 200  # probes need no key

    import grpc

    from aptray.client import Client
    with Client(server["grpc"]) as c, pytest.raises(grpc.RpcError) as e:
        list(c.generate("hi", max_tokens=2))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(server["grpc"], api_key=KEY) as c:
        assert list(c.generate("hi", max_tokens=2))[-1].finished
    r = httpx.post(server["http"] + "/v1/completions", content=b"{not json", headers=AUTH, timeout=30)
    assert r.status_code == 422
    after = _refused(server)
    assert {k: after[k] - before[k] for k in after} == {("http", 401): 2, ("http", 422): 1, ("grpc", 401): 1}
