"""Fast checks of the fault-handling parts without Ray: the store writer across a Redis restart,
admission limits, API key checks, resumption rules."""
import asyncio
import time

import pytest

from aptray.sampling_params import SamplingParams
from aptray.serve.args import AppArgs
from aptray.serve.limits import MAX_MESSAGES, MAX_STOP_TOKEN_IDS, RequestLimits
from aptray.serve.key_load import KeyLoad
from aptray.serve.relay import Rejected, RouterLink
from aptray.serve.security import bearer, grpc_key, key_ok
from aptray.serve.store_writer import StoreUnavailable, StoreWriter
from aptray.serve.store import RequestMeta, RequestStore
from aptray.worker.shard import free_port
from fault_tools import RedisProcess


@pytest.fixture()
def redis_proc():
    r = RedisProcess(free_port(), password="s3cret")
    r.start()
    yield r
    r.close()


def _meta(rid):
    return RequestMeta(rid, time.time(), 1.0, 0.5, [1, 2, 3], {"max_tokens": 8, "temperature": 0.0})


def test_writer_survives_an_empty_restart(redis_proc, monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")  # the password comes from the environment
    store = RequestStore.connect(redis_proc.url, queue_owner="replica-a")
    w = StoreWriter(store)
    try:
        w.admit(_meta("a")).result(5)
        w.admit(_meta("b")).result(5)
        w.tokens({"a": [7, 8], "b": [9]})
        assert w.flush()
        redis_proc.stop()
        w.tokens({"a": [10], "b": [11]})  # generation goes on while Redis is away
        w.finish("b", "length")
        assert w.flush()
        t = time.time()
        with pytest.raises(StoreUnavailable):
            w.admit(_meta("c")).result(10)
        assert time.time() - t < 8 and not w.healthy  # refused, not after the 10 s wait (slow runners: loose bound)
        redis_proc.start()  # empty: no persistence
        deadline = time.time() + 10
        while not w.healthy and time.time() < deadline:
            time.sleep(0.1)
        assert w.healthy and w.outages == 1
        a = store.get("a")
        assert a.output_token_ids == [7, 8, 10] and a.prompt_token_ids == [1, 2, 3]
        assert [m.request_id for m in store.unfinished()] == ["a"]
        assert store.r.hget(store._k("b"), "status") == b"length"  # the finish made while away is replayed
        w.admit(_meta("c")).result(5)
    finally:
        w.close()


def test_writer_repairs_a_store_that_no_longer_mirrors_it(redis_proc, monkeypatch):
    """Redis holds a token the router never made (a late transaction's append): the writer's next append
    for that request is skipped, the writer sees it and resyncs, and Redis again holds the router's
    tokens; the request admitted meanwhile is written too."""
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    store = RequestStore.connect(redis_proc.url, queue_owner="replica-a")
    w = StoreWriter(store)
    try:
        w.admit(_meta("a")).result(5)
        w.tokens({"a": [7, 8]})
        assert w.flush()
        store.r.rpush(store._k("a", "tokens"), 8)  # a duplicate, as a late plain append would leave
        w.tokens({"a": [9]})
        assert w.flush()
        w.admit(_meta("b")).result(5)  # admission resyncs first when the writer knows Redis diverged
        assert w.healthy and w.divergences == 1 and w.outages == 0
        assert store.get("a").output_token_ids == [7, 8, 9] and store.get("b") is not None
        w.tokens({"a": [10]})
        assert w.flush() and store.get("a").output_token_ids == [7, 8, 9, 10] and w.divergences == 1
    finally:
        w.close()


def test_an_admission_through_a_short_redis_stall_is_delayed_not_refused(redis_proc, monkeypatch):
    """Redis stops answering for 4 s, longer than the client's 2 s timeout even where the writer thread
    sends its write late (a starved server on a busy machine): the admission's write times out, the
    writer resyncs at once, and the request is admitted late instead of refused; a stopped Redis still
    refuses within seconds."""
    import os
    import signal
    import threading
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    store = RequestStore.connect(redis_proc.url, queue_owner="replica-a")
    w = StoreWriter(store)
    try:
        w.admit(_meta("a")).result(5)
        w.tokens({"a": [7]})
        assert w.flush()
        pid = redis_proc.proc.pid
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(4.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        t = time.time()
        w.tokens({"a": [8]})
        try:
            w.admit(_meta("b")).result(15)
        finally:
            resume.join()
        assert 2.0 < time.time() - t < 12 and w.healthy and w.outages == 1
        assert store.get("b") is not None and store.get("a").output_token_ids == [7, 8]
        redis_proc.stop()
        t = time.time()
        with pytest.raises(StoreUnavailable):
            w.admit(_meta("c")).result(15)
        assert time.time() - t < 8 and "c" not in w.mirror
    finally:
        w.close()


def test_the_writer_times_each_round_trip_failed_ones_included(redis_proc, monkeypatch):
    """observe_write (the router's aptray_store_write_seconds) gets every write's round trip, the one
    that timed out on a stopped Redis too."""
    import os
    import signal

    from aptray.serve.store import SOCKET_TIMEOUT_S
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    store = RequestStore.connect(redis_proc.url, queue_owner="replica-a")
    seconds = []
    w = StoreWriter(store, seconds.append)
    try:
        w.admit(_meta("a")).result(5)
        assert seconds and max(seconds) < SOCKET_TIMEOUT_S
        pid = redis_proc.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            w.tokens({"a": [7]})
            assert w.flush(10)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert max(seconds) >= SOCKET_TIMEOUT_S and w.outages == 1
    finally:
        w.close()


def test_a_refused_admission_that_redis_ran_late_is_closed_by_the_resync(redis_proc, monkeypatch):
    """Redis stops answering long enough that an admission's write and the resync after it both time
    out: the request is refused. Redis then runs the queued transaction anyway, so its in-flight set
    holds a request nobody generates for; the writer's resync once Redis is back closes it as an
    error, so a restarted router does not resume it, and keeps the request it does hold."""
    import os
    import signal
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    store = RequestStore.connect(redis_proc.url, queue_owner="replica-a")
    w = StoreWriter(store)
    try:
        w.admit(_meta("a")).result(5)
        assert w.flush()
        pid = redis_proc.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                w.admit(_meta("b")).result(15)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert "b" not in w.mirror
        deadline = time.time() + 10
        while not w.healthy and time.time() < deadline:
            time.sleep(0.1)
        assert w.healthy and w.flush()
        assert store.r.hget(store._k("b"), "arrival_time") is not None  # the late transaction ran
        assert [m.request_id for m in store.unfinished()] == ["a"]
        assert store.r.hget(store._k("b"), "status") == b"error" and store.ttl("b") <= store.finished_ttl_s
    finally:
        w.close()


def test_orphaned_owner_is_found(redis_proc, monkeypatch):
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    alive = RequestStore.connect(redis_proc.url, queue_owner="alive")
    gone = RequestStore.connect(redis_proc.url, queue_owner="gone")
    alive.heartbeat()
    alive.add(_meta("x"))
    gone.add(_meta("y"))
    me = RequestStore.connect(redis_proc.url, queue_owner="me")
    assert me.orphaned_owners() == ["gone"]
    assert sorted(m.request_id for m in me.unfinished_everywhere()) == ["x", "y"]


def test_password_file(tmp_path, monkeypatch):
    from aptray.serve.store import redis_password
    (tmp_path / "pw").write_text("from-file\n")
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    assert redis_password() == "from-file"


@pytest.mark.parametrize("ids,sampling,param", [
    ([], {}, "prompt"), ([1, -1], {}, "prompt"), ([1, 10**6], {}, "prompt"), ([1] * 600, {}, "prompt"),
    ([1], {"max_tokens": 0}, "max_tokens"), ([1], {"max_tokens": 9}, "max_tokens"),
    ([1] * 400, {"max_tokens": 8}, "prompt"), ([1], {"max_tokens": 4, "seed": 2**63}, "seed"),
    ([1], {"max_tokens": 4, "top_k": 2**40}, "top_k"), ([1], {"max_tokens": 4, "stop": ["x"] * 17}, "stop"),
    ([1], {"max_tokens": 4, "stop": "y" * 300}, "stop"),
    ([1], {"max_tokens": 4, "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ([1], {"max_tokens": 4, "stop_token_ids": [2, -1]}, "stop_token_ids"),
    ([1], {"max_tokens": 4, "stop_token_ids": [1000]}, "stop_token_ids"),
    ([1], {"max_tokens": 4, "stop_token_ids": [2**63]}, "stop_token_ids"),
    ([1], {"max_tokens": 4, "tbt_slo": 0.0005}, "tbt_ms"), ([1], {"max_tokens": 4, "ttft_slo": 5e-324}, "ttft_ms"),
    ([1], {"max_tokens": 4, "tbt_slo": float("nan")}, "tbt_ms"),
    ([1], {"max_tokens": 4, "ttft_slo": float("inf")}, "ttft_ms")])
def test_request_limits(ids, sampling, param):
    limits = RequestLimits(512, 1000, max_prompt_tokens=300, max_tokens_limit=8, min_ttft_slo=0.001, min_tbt_slo=0.001)
    err, sp = limits.admit(ids, sampling)
    assert err["status"] == 400 and err["param"] == param and sp is None


def test_request_within_limits():
    limits = RequestLimits(512, 1000, None, 8, min_ttft_slo=0.001, min_tbt_slo=0.001)
    err, sp = limits.admit([1, 2], {"max_tokens": 8, "seed": 5, "top_k": 3, "stop": ["x"], "ttft_slo": 0.001,
                                    "tbt_slo": 0.002})
    assert err is None and sp.max_tokens == 8 and sp.stop == ["x"]


@pytest.mark.parametrize("sizes,param", [({"prompt_chars": 300 * 32 + 1}, "prompt"),
                                         ({"num_token_ids": 301}, "prompt"),
                                         ({"num_messages": MAX_MESSAGES + 1}, "messages"),
                                         ({"num_messages": 2, "prompt_chars": 10**6}, "messages")])
def test_sizes_refused_before_tokenizing(sizes, param):
    err = RequestLimits(512, 1000, max_prompt_tokens=300).size_error({"max_tokens": 4}, **sizes)
    assert err["status"] == 400 and err["param"] == param
    assert RequestLimits(512, 1000, max_prompt_tokens=300).size_error({"max_tokens": 4}, prompt_chars=300 * 32) is None


def test_a_key_at_its_cap_queues_no_more_prompts():
    """Requests being tokenized count against their key's max_requests_per_key (RouterLink.preparing),
    so a key at its cap gets 429 before its next prompt reaches the tokenizer thread; other keys and
    callers without keys are not counted against it."""
    link = RouterLink(lambda: None, 1.0, max_per_owner=2)

    async def scenario():
        async with link.preparing("mallory"), link.preparing("mallory"):
            with pytest.raises(Rejected, match=r"this API key has 2 requests in flight \(limit 2\)") as e:
                async with link.preparing("mallory"):
                    pass
            assert e.value.status == 429
            async with link.preparing("alice"), link.preparing(""), link.preparing(""), link.preparing(""):
                pass
        async with link.preparing("mallory"):  # its prompts are done: the key may send again
            pass

    asyncio.run(scenario())
    link.check_choices("mallory", 2, "n")  # as many completions as the cap: served once the key has room
    with pytest.raises(Rejected, match="opens 3 completions, over the 2 this API key may have") as e:
        link.check_choices("mallory", 3, "n")  # never: refused for good, not asked to come again
    assert (e.value.status, e.value.param) == (400, "n")
    link.check_choices("", 3, "n")  # no API keys: no cap


def test_a_keys_cap_counts_its_requests_at_every_replica_sharing_redis(redis_proc, monkeypatch):
    """Two replicas' links over one Redis (KeyLoad): a key's requests at one count at the other, so
    max_requests_per_key holds for the app; a replica that is gone (its liveness key expired) stops
    counting; another key is not counted against it."""
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    url = f"redis://127.0.0.1:{redis_proc.port}/0"

    async def scenario():
        a, b = KeyLoad.connect(url, "replica-a"), KeyLoad.connect(url, "replica-b")
        link_a = RouterLink(lambda: None, 1.0, max_per_owner=3, key_load=a)
        link_b = RouterLink(lambda: None, 1.0, max_per_owner=3, key_load=b)
        async with link_a.preparing("mallory"), link_a.preparing("mallory"):
            await _flushed(a)
            assert await b.others("mallory") == 2 and await b.others("alice") == 0
            async with link_b.preparing("mallory"):
                await _flushed(b)
                with pytest.raises(Rejected, match=r"has 3 requests in flight \(2 at other replicas\) \(limit 3\)"):
                    async with link_b.preparing("mallory"):
                        pass
                with pytest.raises(Rejected, match=r"\(1 at other replicas\)"):
                    async with link_a.preparing("mallory"):
                        pass
                async with link_b.preparing("alice"):
                    pass
            await _flushed(a)
            await _flushed(b)
            assert await a.others("mallory") == 0  # b's request ended
            await a.r.delete(a._alive_prefix + a.token)  # replica a is gone: its two stop counting
            assert await b.others("mallory") == 0
            assert not await b.r.hexists(b._hash("mallory"), a.token)
        await a.close()
        await b.close()

    asyncio.run(scenario())


async def _flushed(load: KeyLoad) -> None:
    """Once load's counts are written."""
    while load._writer is not None and not load._writer.done():
        await asyncio.sleep(0.01)


def test_the_edge_refuses_huge_headers_and_two_keys_before_the_app():
    """EdgeMiddleware over a real ASGI app: headers over MAX_HEADER_BYTES get 431, two Authorization
    headers 400 (which of them is the caller's is not clear), a key that is not one 401, each in OpenAI's
    error shape and before the app runs; a request within the rules reaches it."""
    import httpx
    from fastapi import FastAPI

    from aptray.serve.security import MAX_HEADER_BYTES, EdgeMiddleware
    reached = []
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        reached.append(1)
        return {"ok": True}

    app.add_middleware(EdgeMiddleware, settings={"keys": frozenset({"k1", "k2"}), "max_body": 1 << 20,
                                                 "body_timeout": 30.0})

    async def post(headers):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
            return await client.post("/v1/completions", json={}, headers=headers)

    def answer(headers):
        r = asyncio.run(post(headers))
        return r.status_code, r.json().get("error", {}).get("type")

    assert answer([("authorization", "Bearer k1"), ("x-big", "a" * MAX_HEADER_BYTES)]) == (431, "invalid_request_error")
    assert answer([("authorization", "Bearer k1"), ("authorization", "Bearer k2")]) == (400, "invalid_request_error")
    assert answer([("authorization", "Bearer nope"), ("authorization", "Bearer k1")]) == (400, "invalid_request_error")
    assert answer([("authorization", "Bearer nope")]) == (401, "authentication_error")
    assert not reached
    assert answer([("authorization", "Bearer k2"), ("x-big", "a" * (MAX_HEADER_BYTES // 2))])[0] == 200 and reached


def test_the_edge_answers_a_stalled_body_408_and_an_oversized_one_413():
    """A body whose rest never comes gets 408 once body_timeout_s has passed; chunks past
    max_body_bytes get 413 at once; neither reaches the app."""
    from aptray.serve.security import EdgeMiddleware

    async def app(scope, receive, send):
        raise AssertionError("the app was reached")

    async def status_of(chunks, stall: bool) -> int:
        edge = EdgeMiddleware(app, settings={"keys": frozenset(), "max_body": 100, "body_timeout": 0.2})
        pending, sent = list(chunks), []

        async def receive():
            if pending:
                return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending) or stall}
            await asyncio.sleep(3600)  # the client stopped sending

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "path": "/v1/completions", "headers": []}
        await asyncio.wait_for(edge(scope, receive, send), timeout=10)
        return sent[0]["status"]

    assert asyncio.run(status_of([b'{"prompt": "hel'], stall=True)) == 408
    assert asyncio.run(status_of([b"x" * 60, b"x" * 60], stall=True)) == 413


def test_api_keys():
    keys = frozenset({"k1", "k2"})
    assert key_ok(keys, "k2") and not key_ok(keys, "k3") and not key_ok(keys, None)
    assert key_ok(frozenset(), None)  # no keys configured: open
    assert bearer("Bearer  k1 ") == "k1" and bearer("bearer k1") == "k1"
    assert grpc_key((("application", "aptray"), ("authorization", "Bearer k1"))) == "k1"
    assert grpc_key((("x-api-key", "k2"),)) == "k2" and grpc_key(None) is None
    assert grpc_key((("authorization", "Bearer k1"), ("authorization", "Bearer k2"))) is None  # whose?
    assert grpc_key((("x-api-key", "k1"), ("authorization", "Bearer k2"))) is None
    assert AppArgs.parse({"max_requests_per_key": "8"}).max_requests_per_key == 8
    with pytest.raises(ValueError, match="max_requests_per_key"):
        AppArgs.parse({"max_requests_per_key": 0})
    assert AppArgs.parse({"body_timeout_s": "2.5"}).body_timeout_s == 2.5
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="body_timeout_s"):
            AppArgs.parse({"body_timeout_s": bad})


def test_resumed_request_already_finished():
    """A resumed request whose tokens already end it (its finish was lost with a fault) is finished by
    the engine's own stop rules, replayed: the same reason and text the engine would have given."""
    from aptray.llm import LLM
    from aptray.serve.resume import Resumable, finished
    llm = LLM("tiny-opt-v1", num_cache_blocks=16)
    engine, tok = llm.engine, llm.tokenizer
    eos = tok.eos_token_id
    word = tok.encode(" capital", add_special_tokens=False)
    r = lambda out, **kw: Resumable("r", [1, 5], SamplingParams(max_tokens=3, **kw), 0.0, out)  # noqa: E731
    assert finished(r([7, 8, 9]), engine) == ("length", tok.decode([7, 8, 9], skip_special_tokens=True))
    assert finished(r([7, eos]), engine)[0] == "stop"
    assert finished(r([7, eos], ignore_eos=True), engine) is None
    assert finished(r([7, 8], stop_token_ids=[8]), engine)[0] == "stop"
    before = tok.decode([7], skip_special_tokens=True)
    assert finished(r([7] + word, stop=["capital"]), engine) == ("stop", before + " ")
    assert finished(r([]), engine) is None


def test_a_measured_slo_floor_comes_down_to_the_fastest_step_run():
    """A router measures its SLO floor (the fastest one-token step) as it starts; on a busy machine that
    reads high. Each admission lowers a measured floor to the fastest step its engine has run since, so
    SLOs the engine meets are accepted again; a floor the operator set stays. A real Router (tiny model,
    embedded Redis) in this process: only the start-up measurement is replaced, by a slow one."""
    from dataclasses import replace

    from aptray.serve.relay import Admission
    from aptray.serve.router import Router
    router = Router({"min_ttft_slo_ms": 20_000})
    try:
        assert router.limits.min_ttft_slo == 20.0 and router.limits.min_tbt_slo < 1.0
        router.limits = replace(router.limits, min_tbt_slo=10.0)  # what a start-up on a busy machine could read

        async def finished():
            deadline = time.monotonic() + 30
            while router.loop.streams and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return not router.loop.streams

        async def run():
            def admit(rid, **slos):
                return router.admit([Admission(rid, [5, 6, 7], {"max_tokens": 4, **slos}, None)])
            refused = await admit("req-floor-1", ttft_slo=30.0, tbt_slo=1.0)
            assert refused[0]["status"] == 400 and refused[0]["param"] == "tbt_ms"
            assert "floor of 1e+04 ms" in refused[0]["error"]
            assert (await admit("req-floor-2"))[0]["accepted"]
            assert await finished()
            assert (await admit("req-floor-3", ttft_slo=30.0, tbt_slo=1.0))[0]["accepted"]
            assert await finished()
            operators = await admit("req-floor-4", ttft_slo=5.0, tbt_slo=1.0)
            assert operators[0]["status"] == 400 and operators[0]["param"] == "ttft_ms"

        asyncio.run(run())
        assert router.limits.min_tbt_slo == router.loop.fastest_step_s < 1.0
        assert router.limits.min_ttft_slo == 20.0
    finally:
        router.shutdown()
