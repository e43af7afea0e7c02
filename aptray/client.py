"""gRPC client for generate.proto (sync and asyncio), through Ray Serve's gRPC proxy.

    with Client("localhost:9000") as c:
        for piece in c.generate("Hello", max_tokens=8, ttft_ms=500):
            print(piece.text, end="")
"""
from __future__ import annotations

import json

import grpc

from aptray.proto import generate_pb2, generate_pb2_grpc


def build_request(prompt: str | list[int], client_request_id: str = "", max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  stop: list[str] | None = None, stop_token_ids: list[int] | None = None, seed: int | None = None,
                  ignore_eos: bool = False, ttft_ms: float | None = None, tbt_ms: float | None = None,
                  prefix_key: str = "", min_p: float | None = None, min_tokens: int | None = None,
                  logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
                  prompt_logprobs: int | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None, repetition_penalty: float | None = None,
                  json_schema: str | dict | None = None,
                  json_object: bool = False, regex: str | None = None, choice: list[str] | None = None,
                  grammar: str | None = None, n: int | None = None, skip_special_tokens: bool | None = None,
                  include_stop_str_in_output: bool = False, cache_salt: str | None = None,
                  allowed_token_ids: list[int] | None = None, truncate_prompt_tokens: int | None = None,
                  bad_words: list[str] | None = None) -> generate_pb2.GenerateRequest:
    """prefix_key: a name for the prompt prefix this request shares with others (a conversation id):
    the request router prefers a replica that holds it cached. logprobs: each token's log-probability
    and this many top tokens' (GenerateResponse.logprobs); prompt_logprobs: the prompt tokens' (in
    the first GenerateResponse). json_schema, json_object, regex, choice, grammar: at most one, the
    structure the output is held to (StructuredOutput). n: choices, each its own request (messages
    carry their index; each choice ends with its own finished message). skip_special_tokens=False:
    special tokens show in the text; include_stop_str_in_output: the text keeps what ended it;
    cache_salt: cached prefixes are shared only among requests of the same salt; allowed_token_ids:
    the only tokens it may sample; truncate_prompt_tokens: only the prompt's last k tokens (-1: as
    many as the server takes); bad_words: words the output never has."""
    structured = {"json_schema": json_schema, "json_object": json_object or None, "regex": regex, "choice": choice,
                  "grammar": grammar}
    structured = {k: v for k, v in structured.items() if v is not None}
    if len(structured) > 1:
        raise ValueError(f"at most one structure for the output, got {', '.join(structured)}")
    # the lowest version with the fields set: an older server then serves the rest
    version3 = (logprobs, prompt_logprobs, presence_penalty, frequency_penalty)
    version6 = (skip_special_tokens is not None, include_stop_str_in_output, cache_salt is not None,
                bool(allowed_token_ids), truncate_prompt_tokens is not None, bool(bad_words))
    version = (6 if any(version6) else
               5 if n is not None else 4 if structured or repetition_penalty is not None else
               3 if any(v is not None for v in version3) else
               2 if min_p is not None or min_tokens is not None or logit_bias else 1)
    req = generate_pb2.GenerateRequest(version=version, client_request_id=client_request_id, prefix_key=prefix_key,
                                       n=n or 0, truncate_prompt_tokens=truncate_prompt_tokens)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    s = req.sampling
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed), ("min_p", min_p), ("min_tokens", min_tokens),
                        ("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                        ("repetition_penalty", repetition_penalty), ("skip_special_tokens", skip_special_tokens),
                        ("cache_salt", cache_salt)):
        if value is not None:
            setattr(s, name, value)
    s.stop.extend(stop or [])
    s.stop_token_ids.extend(stop_token_ids or [])
    s.allowed_token_ids.extend(allowed_token_ids or [])
    s.bad_words.extend(bad_words or [])
    s.ignore_eos = ignore_eos
    s.include_stop_str_in_output = include_stop_str_in_output
    s.logit_bias.update(logit_bias or {})
    for kind, value in structured.items():
        if kind == "choice":
            s.structured_output.choice.choices.extend(value)
        elif kind == "json_schema" and not isinstance(value, str):
            s.structured_output.json_schema = json.dumps(value)
        else:
            setattr(s.structured_output, kind, value)
    if ttft_ms is not None:
        req.slo.ttft_ms = ttft_ms
    if tbt_ms is not None:
        req.slo.tbt_ms = tbt_ms
    return req


def call_metadata(application: str, api_key: str | None) -> tuple:
    """Serve's proxy routes on `application`; the API key travels as a Bearer token."""
    md = (("application", application),)
    return md + ((("authorization", f"Bearer {api_key}"),) if api_key else ())


class Client:
    def __init__(self, target: str = "localhost:9000", application: str = "aptray", api_key: str | None = None):
        self.channel = grpc.insecure_channel(target)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.metadata = call_metadata(application, api_key)

    def generate(self, prompt, **kw):
        """Yields GenerateResponse messages; the last has finished=True and usage."""
        yield from self.stub.Generate(build_request(prompt, **kw), metadata=self.metadata)

    def generate_call(self, prompt, **kw):
        """The raw streaming call (iterate it; .cancel() aborts the request on the server)."""
        return self.stub.Generate(build_request(prompt, **kw), metadata=self.metadata)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(generate_pb2.AbortRequest(request_id=request_id), metadata=self.metadata).found

    def health(self) -> generate_pb2.HealthReply:
        return self.stub.Health(generate_pb2.HealthRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    def __init__(self, target: str = "localhost:9000", application: str = "aptray", api_key: str | None = None):
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = generate_pb2_grpc.GenerationStub(self.channel)
        self.metadata = call_metadata(application, api_key)

    async def generate(self, prompt, **kw):
        async for reply in self.stub.Generate(build_request(prompt, **kw), metadata=self.metadata):
            yield reply

    async def abort(self, request_id: str) -> bool:
        return (await self.stub.Abort(generate_pb2.AbortRequest(request_id=request_id), metadata=self.metadata)).found

    async def health(self) -> generate_pb2.HealthReply:
        return await self.stub.Health(generate_pb2.HealthRequest(), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
