"""What Serve's gRPC proxy does with malformed and oversize messages, without Serve: Serve's own server class
(gRPCGenericServer, which swaps every handler's behaviour for its proxy's and keeps its deserializer) with
aptray's registration, a stand-in for the proxy and a fake ingress behind it, on a free local port."""
import asyncio
import os
import pickle
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from types import SimpleNamespace
from unittest.mock import Mock

import grpc
import pytest
from ray.serve._private import grpc_util
from ray.serve._private.proxy_request_response import gRPCStreamingType

from aptray.proto import generate_pb2 as pb
from aptray.proto import generate_pb2_grpc
from aptray.serve import grpc_api, limits
from aptray.serve.grpc_registration import (GRPC_MAX_MESSAGE_BYTES, MAX_MESSAGE_ENV, Undecoded,
                                            add_GenerationServicer_to_server, tolerant)
from aptray.serve.metrics import RefusalCounts
from aptray.serve.relay import Rejected

GENERATE = "/aptray.generate.v1.Generation/Generate"
ABORT = "/aptray.generate.v1.Generation/Abort"
MAX_BODY_BYTES = 1 << 20  # AppArgs.max_body_bytes's default
SERVE_DEFAULT = 2 * 1024 * 1024 * 1024 - 1  # Serve's limit without the env var


class FakeIngress:
    """What grpc_api reads of an Ingress: answers each prompt with its length in usage.prompt_tokens."""

    def __init__(self):
        self.api_keys, self.refusals, self.model_name = frozenset(), RefusalCounts(), "fake"
        self.args = SimpleNamespace(max_body_bytes=MAX_BODY_BYTES, retry_after_s=1)
        self.limits = SimpleNamespace(kept_tokens=lambda truncate: None)
        self.link = SimpleNamespace(preparing=asynccontextmanager(self._nothing), call=lambda rid: None)
        self.router = SimpleNamespace(health=SimpleNamespace(remote=self._health))
        self.calls = 0

    async def _nothing(self, owner):
        yield

    async def _health(self):
        return {"ok": True, "draining": False, "waiting": 0, "running": 0}

    async def prompts_of(self, prompt, sampling, n, keep=None):
        self.calls += 1
        return [(prompt, prompt if isinstance(prompt, list) else [])]

    async def open_choices(self, rid, prompts, sampling, owner, prefix, n):
        return [SimpleNamespace(rid=rid, length=len(prompts[0][0]))]

    async def batches(self, calls):
        usage = {"prompt_tokens": calls[0].length, "completion_tokens": 0}
        yield 0, [{"finished": True, "finish_reason": "stop", "token_ids": [], "text": "", "usage": usage}]


def proxy_handlers(ingress: FakeIngress):
    """Serve's service_handler_factory in small (ray/serve/_private/proxy.py, gRPCProxy): the request as
    its handler's deserializer made it, pickled to the replica; replies as bytes; a refusal's status is the
    code and details the ingress set on the call."""
    calls = {"Abort": grpc_api.abort, "Health": grpc_api.health}

    def factory(service_method: str, streaming_type):
        name = service_method.rsplit("/", 1)[1]

        async def unary_unary(request, context):
            try:
                return (await calls[name](ingress, pickle.loads(pickle.dumps(request)), context)).SerializeToString()
            except Rejected:
                return b""

        async def unary_stream(request, context):
            try:
                async for reply in grpc_api.generate(ingress, pickle.loads(pickle.dumps(request)), context):
                    yield reply.SerializeToString()
            except Rejected:
                return
        return {gRPCStreamingType.UNARY_UNARY: unary_unary, gRPCStreamingType.UNARY_STREAM: unary_stream}.get(
            streaming_type, unary_unary)
    return factory


@pytest.fixture
def serve_server(monkeypatch):
    """start(limit): Serve's gRPC server class with DEFAULT_GRPC_SERVER_OPTIONS at limit (what the env var
    makes them), aptray's registration, on a free port; returns (address, the fake ingress)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = []

    def start(limit: int):
        monkeypatch.setattr(grpc_util, "DEFAULT_GRPC_SERVER_OPTIONS", [
            ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
        ingress = FakeIngress()

        async def serve():
            server = grpc_util.gRPCGenericServer(proxy_handlers(ingress))
            port = server.add_insecure_port("127.0.0.1:0")
            add_GenerationServicer_to_server(Mock(), server)  # as start_grpc_server registers it
            await server.start()
            return server, port
        server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
        servers.append(server)
        return f"127.0.0.1:{port}", ingress
    yield start
    for server in servers:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _channel(address: str):
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1),
                                                   ("grpc.max_receive_message_length", -1)])


def _oversize_generate(address: str) -> grpc.RpcError:
    """The error of a Generate whose message is just over GRPC_MAX_MESSAGE_BYTES (3-byte varint ids)."""
    big = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[2**21 - 1] * (GRPC_MAX_MESSAGE_BYTES // 3 + 1)))
    with _channel(address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            list(generate_pb2_grpc.GenerationStub(channel).Generate(big, timeout=30))
    return e.value


def _generate_raw(channel, raw: bytes) -> list[pb.GenerateResponse]:
    call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    return list(call(raw, timeout=30))


def _corrupt_messages() -> dict[str, bytes]:
    raw = pb.GenerateRequest(prompt="hello", client_request_id="x").SerializeToString()
    return {"invalid UTF-8 in a string": raw.replace(b"hello", b"\xff\xfe\xfdlo"), "truncated": raw[:-2]}


def _largest_text_request() -> pb.GenerateRequest:
    """A prompt of max_body_bytes (of 4-byte characters), with every other field at its admission limit."""
    sampling = pb.Sampling(stop=["s" * limits.MAX_STOP_CHARS] * limits.MAX_STOP,
                           stop_token_ids=range(limits.MAX_STOP_TOKEN_IDS),
                           bad_words=["\U0001F600" * limits.MAX_STOP_CHARS] * limits.MAX_BAD_WORDS,
                           allowed_token_ids=range(2**21 - limits.MAX_ALLOWED_TOKEN_IDS, 2**21),
                           logit_bias={i: 1.0 for i in range(limits.MAX_LOGIT_BIAS_TOKENS)})
    sampling.structured_output.regex = "r" * 65_536
    return pb.GenerateRequest(version=6, prompt="\U0001F600" * (MAX_BODY_BYTES // 4), sampling=sampling,
                              client_request_id="c" * 128, prefix_key="p" * 128)


def test_the_env_var_sets_serves_grpc_server_options():
    """Serve's only lever on its gRPC server's message size: the env var, read when Serve is imported."""
    code = "from ray.serve._private.constants import DEFAULT_GRPC_SERVER_OPTIONS as o; print(sorted(o))"
    env = {**os.environ, MAX_MESSAGE_ENV: str(GRPC_MAX_MESSAGE_BYTES)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted([("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES)]))


@pytest.mark.parametrize("kind", sorted(_corrupt_messages()))
def test_a_corrupt_message_is_invalid_argument(serve_server, kind):
    address, ingress = serve_server(GRPC_MAX_MESSAGE_BYTES)
    with _channel(address) as channel:
        with pytest.raises(grpc.RpcError) as e:
            _generate_raw(channel, _corrupt_messages()[kind])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "could not be decoded" in e.value.details()
        abort = channel.unary_unary(ABORT, request_serializer=None, response_deserializer=pb.AbortReply.FromString)
        with pytest.raises(grpc.RpcError) as e:
            abort(b"\x0a\x05\xff\xfe\xfd\xfc\xfb", timeout=30)  # request_id: 5 bytes of invalid UTF-8
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert ingress.calls == 0 and ingress.refusals.counts == {("grpc", 400): 2}


def test_valid_messages_are_served(serve_server):
    address, _ = serve_server(GRPC_MAX_MESSAGE_BYTES)
    with _channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        (reply,) = stub.Generate(pb.GenerateRequest(prompt="hello", client_request_id="x"), timeout=30)
        assert (reply.finished, reply.client_request_id, reply.usage.prompt_tokens) == (True, "x", 5)
        assert stub.Abort(pb.AbortRequest(request_id="gen-1"), timeout=30).found is False
        assert stub.Health(pb.HealthRequest(), timeout=30).ok


def test_the_largest_requests_pass(serve_server):
    """A prompt of max_body_bytes of text, or a 131,072-token context's ids, each with every other field at
    its limit, is served: the limit leaves room for what HTTP accepts."""
    text = _largest_text_request()
    ids = pb.GenerateRequest()
    ids.CopyFrom(text)
    ids.prompt_token_ids.ids.extend([2**21 - 1] * 131_071)
    assert max(text.ByteSize(), ids.ByteSize()) < GRPC_MAX_MESSAGE_BYTES // 2
    address, _ = serve_server(GRPC_MAX_MESSAGE_BYTES)
    with _channel(address) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        assert [r.usage.prompt_tokens for r in stub.Generate(text, timeout=60)] == [MAX_BODY_BYTES // 4]
        assert [r.usage.prompt_tokens for r in stub.Generate(ids, timeout=60)] == [131_071]


def test_the_largest_reply_is_under_the_send_limit():
    """The env var caps the proxy's sends too: the first reply of a prompt with 20 prompt_logprobs a token
    (8,192 tokens: SmolLM2's context) fits."""
    reply = pb.GenerateResponse(request_id="gen-" + "0" * 32, text="x" * 80, token_ids=range(16))
    for _ in range(8192):
        reply.prompt_logprobs.add(logprob=-1.5, top_ids=range(2**21 - 20, 2**21), top_logprobs=[-1.5] * 20, rank=99)
    assert reply.ByteSize() < GRPC_MAX_MESSAGE_BYTES // 2


def test_an_oversize_message_is_refused_at_the_transport(serve_server):
    address, ingress = serve_server(GRPC_MAX_MESSAGE_BYTES)
    e = _oversize_generate(address)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    assert ingress.refusals.counts == {}  # never reached the proxy's handler, let alone the ingress


def test_without_the_env_var_an_oversize_message_is_refused_before_decoding(serve_server, monkeypatch):
    monkeypatch.delenv(MAX_MESSAGE_ENV, raising=False)
    address, ingress = serve_server(SERVE_DEFAULT)
    e = _oversize_generate(address)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    assert "over this server's limit" in e.details()
    assert ingress.calls == 0 and ingress.refusals.counts == {("grpc", 413): 1}


def test_tolerant_deserializer():
    decode = tolerant(pb.GenerateRequest.FromString, 64)
    assert decode(pb.GenerateRequest(prompt="hi").SerializeToString()).prompt == "hi"
    assert isinstance(decode(b"\xff"), Undecoded) and not decode(b"\xff").oversize
    assert decode(b"\x00" * 65).oversize
    assert pickle.loads(pickle.dumps(decode(b"\xff"))) == decode(b"\xff")  # it travels to the replica


def test_refusals_are_told_from_failures():
    """What Serve logs for a gRPC call that raised: a Rejected under 500 (as raised, as Serve wraps it, as
    Ray ships it) is a refusal, which Serve's logger then drops; a 5xx or any other exception is not."""
    import logging

    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import gRPCStatusError

    from aptray.serve.grpc_refusal_logs import QuietRefusals, is_refusal

    wrapped = gRPCStatusError(Rejected("shed", 429), grpc.StatusCode.RESOURCE_EXHAUSTED, "shed")
    shipped = RayTaskError("Ingress.Generate", "traceback", wrapped)
    assert is_refusal(Rejected("bad", 400)) and is_refusal(wrapped) and is_refusal(shipped)
    assert not is_refusal(Rejected("broken", 500)) and not is_refusal(RuntimeError("boom"))
    assert not is_refusal(gRPCStatusError(RuntimeError("boom"), grpc.StatusCode.INTERNAL)) and not is_refusal(None)

    def record(exc):
        return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None,
                                 (type(exc), exc, None) if exc else None)
    quiet = QuietRefusals()
    assert not quiet.filter(record(wrapped))
    assert quiet.filter(record(RuntimeError("boom"))) and quiet.filter(record(None))
