"""Ingress: the Ray Serve deployment clients talk to (OpenAI HTTP + aptray gRPC).

It validates and tokenizes, asks its Router for admission, and relays token chunks (relay.py:
one Ray stream from the router for all requests). Each ingress replica owns one Router actor
(and through it the model): replicas are data-parallel. When the router dies the ingress starts
a new one and re-attaches every open stream, so the client sees a pause, not an error
(docs/RELIABILITY.md). Chunks that arrive together are written to a client in one piece (one SSE
event per chunk still), so a replica that falls behind catches up in fewer, larger writes.
"""

import asyncio
import copy
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from functools import partial
from typing import NamedTuple

import ray
from fastapi import Request
from ray.exceptions import RayActorError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from aptray.serve import choices, grpc_api, grpc_refusal_logs, tools
from aptray.serve.args import INGRESS_CPUS, AppArgs
from aptray.serve.deploy_options import ATTAINMENT_WINDOW_S
from aptray.serve.openai_api import (ChatChoice, ChatChoiceMessage, ChatCompletionRequest, ChatCompletionResponse,
                                     CompletionChoice, CompletionRequest, CompletionResponse, LogprobsRenderer,
                                     chunk_logprobs, error_body, finish_reason, new_id, top_of, unsupported_field)
from aptray.serve.relay import Call, Rejected, RouterLink, invalid_as_400
from aptray.model.demo import resolve_model_path
from aptray import outputs
from aptray.serve.http_app import api
from aptray.serve.key_load import KeyLoad
from aptray.serve.metrics import CountRefusals, RefusalCounts
from aptray.serve.prefix_key import PREFIX_KEY_HEADER, prefix_tag
from aptray.serve.router import Router
from aptray.serve.service_routes import STATS_TIMEOUT_S, ServiceRoutes
from aptray.serve.security import EdgeMiddleware, bearer, identity, key_salt
from aptray.serve.sse import ChatEvents, CompletionEvents, sse, usage
from aptray.serve.tokenize_api import Tokenizing
from aptray.serve.tools import ToolCallEvents
from aptray.serve.store import RequestStore
from aptray.serve.ttft_estimate import ReplicaLoad, ServingDelay

logger = logging.getLogger("aptray")
ROUTER_NAME = "aptray-router:{app}:{replica}:{n}"  # the n-th Router actor of an ingress replica
REPLICA_HEADER = b"x-aptray-replica"


def _kept(text: str | None, ids: list[int], keep: int | None) -> tuple[str | None, list[int]]:
    """A prompt's (text, ids) with only its last keep tokens (truncate_prompt_tokens): the text is
    then None, as it no longer matches them."""
    if keep is None or len(ids) <= keep:
        return text, ids
    return None, ids[-keep:]


class Reply(NamedTuple):
    """A non-streamed request's reply, its chunks joined."""
    text: str
    token_ids: list[int]
    logprobs: list  # per token: aptray.plan.TokenLogprobs, None where not asked or unknown
    prompt_logprobs: list  # per prompt token where asked (echo with logprobs), else empty
    last: dict  # the last chunk: finish reason, usage


class ReplicaHeader:
    """Names the replica that answered in every HTTP response (x-aptray-replica: its Serve id):
    which one the request router chose, for operators and the routing tests."""

    def __init__(self, app, replica_fn):
        self.app, self.replica_fn = app, replica_fn

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.replica_fn())]}
            await send(message)
        await self.app(scope, receive, send_with_header)


# set by the Ingress replica (one per process)
_edge = {"keys": frozenset(), "max_body": 1 << 20, "body_timeout": 30.0, "replica": b""}
api.add_middleware(EdgeMiddleware, settings=_edge)
api.add_middleware(ReplicaHeader, replica_fn=lambda: _edge["replica"])
REFUSALS = RefusalCounts()  # this process's replica's (one per process)
api.add_middleware(CountRefusals, counts=REFUSALS)  # outermost: it sees the edge's 401 and 413 too


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    # malformed JSON and schema errors alike: 422 in OpenAI's error shape
    errors = [{k: e.get(k) for k in ("type", "loc", "msg")} for e in exc.errors()[:3]]  # never echo the input
    return JSONResponse(error_body(str(errors), 422), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # unknown paths (404), wrong methods (405): the same error shape as everything else
    return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    logger.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", 500), status_code=500)


def _replica_id() -> tuple[str, str]:
    """(this replica's Serve id, its app's name)."""
    try:
        rid = serve.get_replica_context().replica_id
        return rid.unique_id, rid.deployment_id.app_name
    except Exception:  # outside Serve (a test building the class directly)
        return new_id("replica"), ""


@serve.deployment(name="Ingress", max_ongoing_requests=1024, graceful_shutdown_timeout_s=30,
                  ray_actor_options={"num_cpus": INGRESS_CPUS})
@serve.ingress(api)
class Ingress(ServiceRoutes):
    def __init__(self, args: dict | None = None):
        from transformers import AutoTokenizer

        self.args = AppArgs.parse(args)
        # read once: the HTTP edge, each request's caller identity and the gRPC API check one set
        self.api_keys = self.args.api_key_set()
        _edge.update(keys=self.api_keys, max_body=self.args.max_body_bytes, body_timeout=self.args.body_timeout_s)
        grpc_refusal_logs.install()
        model = resolve_model_path(self.args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.tokenizer or model)
        self.model_name = self.args.served_model_name or os.path.basename(model.rstrip("/"))
        self.router_args = dict(args or {})
        self.embedded_store = None
        if not (self.args.redis_url or os.environ.get("APTRAY_REDIS_URL")):
            # the embedded Redis lives in the replica, not the router, so it outlives a router restart
            self.embedded_store = RequestStore.embedded()
            self.router_args["redis_url"] = self.embedded_store.url
        self.owner, self.app_name = _replica_id()  # owner: the router's in-flight set in Redis, stable across restarts
        _edge["replica"] = self.owner.encode()
        # decided once, here: where the model runs (router or shards) needs it for the router's resources
        self.use_gpu = self.args.use_gpu if self.args.use_gpu is not None else (
            ray.cluster_resources().get("GPU", 0) >= self.args.tensor_parallel_size)
        self.router_args["use_gpu"] = self.use_gpu
        self._recovery: asyncio.Task | None = None
        self._routers_started = 0
        self.link = RouterLink(self._start_router, self.args.router_restart_timeout_s, self.args.max_requests_per_key,
                               self._key_load())
        self.serving_delay = ServingDelay()
        self.refusals = REFUSALS
        # tokenizers and chat templates run here, off the event loop: a long prompt must not stall
        # every other request's stream (one thread: a tokenizer is not shared across threads safely)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aptray-tokenize")
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._token_text_tokenizer = None
        info = ray.get(self.router.ready.remote())
        self.max_model_len = info["max_model_len"]
        self.limits = info["limits"]
        self.tokenizing = Tokenizing(self.tokenizer, self.limits, self.max_model_len)  # /tokenize, /detokenize
        logger.info("ingress ready: %s, %d blocks, store %s", self.model_name, info["num_blocks"], info["store"])

    @property
    def router(self):
        return self.link.router

    def _key_load(self) -> KeyLoad | None:
        """Where max_requests_per_key counts across the replicas that share this one's Redis."""
        url = self.router_args.get("redis_url") or os.environ.get("APTRAY_REDIS_URL")
        if self.args.max_requests_per_key is None or url in (None, "", "embedded"):
            return None  # no cap, or a Redis of the router's own: this replica counts alone
        return KeyLoad.connect(url, self.owner)

    def _start_router(self):
        # named (ROUTER_NAME): operators and fault drills find a replica's router; a replacement gets the next number
        opts = {**self.args.router_resources(self.use_gpu), "max_concurrency": 10_000,
                "name": ROUTER_NAME.format(app=self.app_name, replica=self.owner, n=self._routers_started)}
        self._routers_started += 1
        if self.embedded_store is not None:  # a unix socket: same node as the replica
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                         soft=False)
        return ray.remote(Router).options(**opts).remote(self.router_args, self.owner)

    # -- shared path --------------------------------------------------------------------------
    async def open_stream(self, rid: str, ids: list[int], sampling: dict, prompt: str | None, owner: str = "",
                          prefix: str | None = None) -> Call:
        """Admission: returns the call once its request is accepted. prefix: the tag of the prompt
        prefix the client named (prefix_key.py), which the replica reports while it holds it."""
        probe = self.serving_delay.begin(len(ids), self.link.open_calls())
        call = await self.link.open(rid, ids, sampling, prompt, owner, prefix)
        call.ttft_probe = probe
        return call

    async def open_choices(self, rid: str, prompts: list[tuple[str | None, list[int]]], sampling: dict, owner: str,
                           prefix: str | None, n: int) -> list[Call]:
        """The calls of each prompt's n choices ((text, token ids) each; aptray.serve.choices where there
        are several), each admitted."""
        self.link.check_choices(owner, len(prompts) * n, "n" if n > 1 else "prompt")
        if self.args.prefix_cache_per_key and owner:
            sampling = {**sampling, "cache_salt": invalid_as_400(key_salt, owner, sampling.get("cache_salt"))}
        if n == 1 and len(prompts) == 1:
            return [await self.open_stream(rid, prompts[0][1], sampling, prompts[0][0], owner, prefix)]
        return await choices.open_choices(self, rid, prompts, sampling, owner, prefix, n)

    async def batches(self, calls: list[Call]):
        """(choice index, batch of chunks) until every choice finishes (choices.merged where n > 1)."""
        if len(calls) > 1:
            async with aclosing(choices.merged(self, calls)) as merged:
                async for item in merged:
                    yield item
            return
        async with aclosing(self.chunks(calls[0])) as batches:
            async for batch in batches:
                yield 0, batch

    def check_size(self, sampling: dict, **sizes) -> None:
        """What is too big to tokenize is refused before tokenizing (RequestLimits.size_error)."""
        refusal = self.limits.size_error(sampling, **sizes)
        if refusal is not None:
            raise Rejected.of(refusal)

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenizer thread (tokenizing, chat templates)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def caller(self, raw: Request) -> str:
        """Who sent raw (security.identity): who may abort its request."""
        return identity(self.api_keys, bearer(raw.headers.get("authorization")))

    @staticmethod
    def prefix_of(raw: Request) -> str | None:
        """The tag of the prefix key raw names in its header (the one the request router read), or None."""
        return prefix_tag(raw.headers.get(PREFIX_KEY_HEADER))

    async def chunks(self, call: Call):
        """Lists of chunks (those that arrived together) until the request finishes. The first
        one ends the timing of what the serving path added to its TTFT (ttft_estimate.ServingDelay)."""
        async with aclosing(self.link.chunks(call)) as batches:
            async for batch in batches:
                if call.ttft_probe is not None:
                    self.serving_delay.first_chunk(call.ttft_probe, reattached=call.epoch > 0)
                    call.ttft_probe = None
                yield batch

    def _reject(self, e: Rejected) -> JSONResponse:
        retry_after = e.retry_after or self.args.retry_after_s
        headers = {"Retry-After": str(retry_after)} if e.status == 429 else None
        return JSONResponse(error_body(str(e), e.status, e.param), status_code=e.status, headers=headers)

    def _check_served(self, model: str | None) -> None:
        if model not in (None, "", self.model_name):
            raise Rejected(f"model {model!r} is not served here; this server has {self.model_name!r}", 404, "model")

    def _check_model(self, req) -> None:
        self._check_served(req.model)
        if not 1 <= req.n <= choices.MAX_CHOICES:
            raise Rejected(f"n must be in [1, {choices.MAX_CHOICES}] on this server", 400, "n")
        if getattr(req, "top_logprobs", None) and not req.logprobs:
            raise Rejected("top_logprobs needs logprobs set to true", 400, "top_logprobs")
        unsupported = unsupported_field(req)
        if unsupported:
            raise Rejected(f"{unsupported} is not supported by this server: leave it out, or at its default", 400,
                           unsupported)

    # -- OpenAI HTTP --------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest, raw: Request):
        try:
            self._check_model(req)
            owner = self.caller(raw)
            async with self.link.preparing(owner):  # a key at its cap: 429 before its prompt is tokenized
                sampling = invalid_as_400(req.sampling, req.max_tokens or 16)
                # echo with logprobs scores the prompt too (computed whole, without the prefix cache)
                echo_k = req.logprobs if req.echo else None
                sampling["prompt_logprobs"] = max((k for k in (echo_k, req.prompt_logprobs) if k is not None),
                                                  default=None)
                keep = invalid_as_400(self.limits.kept_tokens, req.truncate_prompt_tokens)
                prompts = await self.prompts_of(req.prompt, sampling, req.n, req.add_special_tokens, keep)
            rid = new_id("cmpl")
            calls = await self.open_choices(rid, prompts, sampling, owner, self.prefix_of(raw), req.n)
        except Rejected as e:
            return self._reject(e)
        echoes = [None] * len(prompts)
        if req.echo:  # each prompt as the client sent it, or the text of its token ids
            echoes = [text if text is not None else await self.off_loop(self.tokenizer.decode, ids)
                      for text, ids in prompts]
        n, one = req.n, len(calls) == 1
        renderers = [LogprobsRenderer(self.token_text) if req.logprobs is not None else None for _ in calls]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            continuous = bool(req.stream_options and req.stream_options.continuous())
            events = [CompletionEvents(rid, self.model_name, include_usage and one,
                                       prompts[i // n][1] if req.return_token_ids else None, renderer,
                                       None if echoes[i // n] is None else (echoes[i // n], prompts[i // n][1]), i,
                                       len(prompts[i // n][1]) if continuous else None)
                      for i, renderer in enumerate(renderers)]
            return StreamingResponse(self._sse_stream(calls, events, include_usage and not one, n),
                                     media_type="text/event-stream")
        try:
            replies = await self._collect(calls)
        except Rejected as e:
            return self._reject(e)
        asked = req.return_token_ids
        choices = []
        for i, (reply, renderer) in enumerate(zip(replies, renderers)):
            ids, logprobs = prompts[i // n][1], None
            if renderer and req.echo:
                logprobs = renderer.completion(ids + reply.token_ids,
                                               top_of(reply.prompt_logprobs, req.logprobs) + reply.logprobs)
            elif renderer:
                logprobs = renderer.completion(reply.token_ids, reply.logprobs)
            choices.append(CompletionChoice(
                index=i, text=(echoes[i // n] or "") + reply.text, token_ids=reply.token_ids if asked else None,
                logprobs=logprobs, finish_reason=finish_reason(reply.last["finish_reason"]),
                prompt_token_ids=ids if asked else None, prompt_logprobs=self._prompt_logprobs(req, ids, reply)))
        return CompletionResponse(id=rid, model=self.model_name, usage=usage(*(r.last for r in replies), n=n),
                                  choices=choices)

    def _prompt_logprobs(self, req, ids: list[int], reply: Reply) -> list | None:
        """vLLM's prompt_logprobs of a reply, where the request asked."""
        if req.prompt_logprobs is None:
            return None
        return LogprobsRenderer(self.token_text).prompt(ids, top_of(reply.prompt_logprobs, req.prompt_logprobs))

    async def _collect(self, calls: list) -> list[Reply]:
        """A non-streaming request's whole reply, per choice."""
        n = len(calls)
        pieces, ids, logprobs = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        prompt_logprobs, last = [[] for _ in range(n)], [None] * n
        async with aclosing(self.batches(calls)) as batches:
            async for i, batch in batches:
                for c in batch:
                    pieces[i].append(c["text"])
                    ids[i].extend(c["token_ids"])
                    logprobs[i].extend(chunk_logprobs(c))
                    prompt_logprobs[i] = c.get("prompt_logprobs") or prompt_logprobs[i]
                last[i] = batch[-1]
        return [Reply("".join(pieces[i]), ids[i], logprobs[i], prompt_logprobs[i], last[i]) for i in range(n)]

    def token_text(self, token_id: int) -> str:
        """A token's text as log-probabilities show it (outputs.token_text; cached: at most one entry per
        vocabulary id)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = outputs.token_text(self._event_loop_tokenizer(), token_id)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, as chat's log-probabilities show them (outputs.token_bytes; cached)."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = outputs.token_bytes(self._event_loop_tokenizer(), token_id,
                                                                    self.token_text(token_id))
        return raw

    def _event_loop_tokenizer(self):
        if self._token_text_tokenizer is None:  # its own copy: the tokenizer thread uses self.tokenizer
            self._token_text_tokenizer = copy.deepcopy(self.tokenizer)
        return self._token_text_tokenizer

    async def prompts_of(self, prompt, sampling: dict, n: int, add_special_tokens: bool = True,
                         keep: int | None = None) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) of each prompt: a string (add_special_tokens: with the tokenizer's
        own, BOS...), token ids, or a list of either. keep: only each prompt's last keep tokens (its
        text is then None), and a prompt longer than the server takes is no error."""
        many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
        prompts = prompt if many else [prompt]
        if len(prompts) > choices.MAX_PROMPTS or len(prompts) * n > choices.MAX_REQUESTS:
            raise Rejected(f"at most {choices.MAX_PROMPTS} prompts, and prompts times n at most "
                           f"{choices.MAX_REQUESTS}, on this server", 400, "prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                self.check_size(sampling, prompt_chars=len(p), truncated=keep is not None)
                encode = partial(self.tokenizer.encode, add_special_tokens=add_special_tokens)
                out.append(_kept(p, await self.off_loop(encode, p), keep))
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                self.check_size(sampling, num_token_ids=len(p), truncated=keep is not None)
                out.append(_kept(None, list(p), keep))
            else:
                raise Rejected("a prompt is a string or a list of token ids, or a list of these", 400, "prompt")
        return out

    async def _sse_stream(self, calls: list, events: list, total_usage: bool = False, n: int | None = None):
        """The SSE body of a streamed request: each choice's token events as they come (events[i]
        renders choice i), the usage of all choices where total_usage (n: choices per prompt, where a
        completion has several prompts), an error event if it fails, [DONE]."""
        try:
            last = {}
            async with aclosing(self.batches(calls)) as batches:  # closed at once if the client goes
                async for i, batch in batches:
                    yield events[i].render(batch)
                    last[i] = batch[-1]
            if total_usage:
                yield sse(events[0]._usage_model(usage(*(last[i] for i in sorted(last)), n=n)))
        except Rejected as e:
            yield sse(error_body(str(e), e.status))
        except Exception as e:  # headers are sent: an error event is all a client can still get
            logger.exception("stream failed")
            yield sse(error_body(f"internal error: {type(e).__name__}", 500))
        yield "data: [DONE]\n\n"

    async def open_chat(self, req: ChatCompletionRequest, raw: Request, kind: str = "chatcmpl"
                        ) -> tuple[tools.ToolReply, list[int], str, list[Call]]:
        """A chat request admitted: what its reply is (text or tool calls), its prompt's token ids,
        its id (kind-...) and the calls of its choices. Rejected where it is refused."""
        self._check_model(req)
        owner = self.caller(raw)
        async with self.link.preparing(owner):
            reply, sampling = invalid_as_400(tools.chat_sampling, req, self.args.tool_call_parser)
            keep = invalid_as_400(self.limits.kept_tokens, req.truncate_prompt_tokens)
            chars = invalid_as_400(tools.chat_chars, req.messages, sampling["tools"])
            self.check_size(sampling, num_messages=len(req.messages), prompt_chars=chars, truncated=keep is not None)
            text, ids = _kept(*await self.off_loop(invalid_as_400, tools.chat_prompt, self.tokenizer, req,
                                                   sampling.pop("tools")), keep)
        rest = max(1, self.max_model_len - len(ids))
        sampling["max_tokens"] = (req.max_completion_tokens or req.max_tokens
                                  or min(rest, self.args.max_tokens_limit or rest))
        rid = new_id(kind)
        return reply, ids, rid, await self.open_choices(rid, [(text, ids)], sampling, owner, self.prefix_of(raw),
                                                        req.n)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest, raw: Request):
        try:
            reply, ids, rid, calls = await self.open_chat(req, raw)
        except Rejected as e:
            return self._reject(e)
        renderers = [LogprobsRenderer(self.token_text, self.token_bytes) if req.logprobs else None for _ in calls]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            kw = {"usage_prompt_tokens": len(ids) if req.stream_options and req.stream_options.continuous() else None}
            args = [(rid, self.model_name, include_usage and req.n == 1, ids if req.return_token_ids else None,
                     renderer) for renderer in renderers]
            events = [ChatEvents(*a, index=index, **kw) if reply.mode == "text"
                      else ToolCallEvents(reply, *a, index=index, **kw) for index, a in enumerate(args)]
            return StreamingResponse(self._chat_sse(calls, events, include_usage and req.n > 1),
                                     media_type="text/event-stream")
        try:
            replies = await self._collect(calls)
        except Rejected as e:
            return self._reject(e)
        asked, choices = req.return_token_ids, []
        for index, (answer, renderer) in enumerate(zip(replies, renderers)):
            reason = answer.last["finish_reason"]
            content, calls = reply.parse(answer.text) if reason == "stop" else (answer.text, None)
            message = ChatChoiceMessage(content=content, tool_calls=calls)
            choices.append(ChatChoice(index=index, message=message, token_ids=answer.token_ids if asked else None,
                                      logprobs=renderer.chat(answer.token_ids, answer.logprobs) if renderer else None,
                                      finish_reason="tool_calls" if calls else finish_reason(reason)))
        return ChatCompletionResponse(id=rid, model=self.model_name, usage=usage(*(r.last for r in replies)),
                                      prompt_token_ids=ids if asked else None, choices=choices,
                                      prompt_logprobs=self._prompt_logprobs(req, ids, replies[0]))

    async def _chat_sse(self, calls: list, events: list, total_usage: bool = False):
        for choice in events:
            yield choice.role()
        async for event in self._sse_stream(calls, events, total_usage):
            yield event

    # -- Serve's hooks for routing and autoscaling (slo_router.py, autoscale.py) ---------------
    async def record_routing_stats(self) -> dict | None:
        """This replica's load (ttft_estimate.ReplicaLoad), pulled by Serve's controller every
        routing_stats_period_s for the request routers. A router being replaced reports "ok": False
        (routers send new requests elsewhere meanwhile); a router too slow to answer, nothing."""
        if self._replacing():
            return {"taken_at": time.time(), "ok": False}
        try:
            stats = await asyncio.wait_for(self.router.load.remote(), STATS_TIMEOUT_S)
        except RayActorError:
            self._recover_in_background()
            return {"taken_at": time.time(), "ok": False}
        except asyncio.TimeoutError:
            return None
        self.serving_delay.engine_load = ReplicaLoad.from_stats(stats)
        return {**stats, "stream_s": self.serving_delay.stream_s, "streams": self.link.open_calls()}

    async def record_autoscaling_stats(self) -> dict:
        """Attainment and TTFT pressure for the goodput autoscaling policy (autoscale.py)."""
        if self._replacing():
            return {}
        try:
            return await asyncio.wait_for(self.router.autoscaling_stats.remote(ATTAINMENT_WINDOW_S), STATS_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError):
            return {}

    # -- gRPC (through Serve's gRPC proxy; method names match generate.proto) ------------------
    async def Generate(self, request, grpc_context=None):
        async for reply in grpc_api.generate(self, request, grpc_context):
            yield reply

    async def Abort(self, request, grpc_context=None):
        return await grpc_api.abort(self, request, grpc_context)

    async def Health(self, request, grpc_context=None):
        return await grpc_api.health(self, request, grpc_context)

    # -- lifecycle ----------------------------------------------------------------------------
    async def check_health(self):
        # a router being replaced is healthy enough: Serve's check times out long before a new router
        # is up, and replacing this replica would cut every open stream. A failed replacement is not.
        if self._recovery is not None and self._recovery.done():
            failed, self._recovery = self._recovery.exception(), None
            if failed is not None:
                raise RuntimeError(f"router could not be replaced: {failed!r}")
        if self.link.lock.locked() or self._recovery is not None:
            return
        try:
            h = await asyncio.wait_for(self.router.health.remote(), timeout=20)
        except RayActorError:
            self._recover_in_background()
            return
        if not h["ok"]:
            raise RuntimeError(f"router unhealthy: {h['error'] or 'engine thread is dead'}")

    def _replacing(self) -> bool:
        """Whether a new router is being started for this replica."""
        return self.link.lock.locked() or (self._recovery is not None and not self._recovery.done())

    def _recover_in_background(self) -> None:
        if self._recovery is None:
            self._recovery = asyncio.create_task(self.link.recover(self.router))

    async def __del__(self):
        # Serve has drained this replica's requests by now; let the router finish stragglers,
        # then release the shards and their placement group before the actors go
        try:
            await self.router.drain.remote(self.args.drain_timeout_s)
            await self.router.shutdown.remote()
            ray.kill(self.router)
        except Exception:
            logger.exception("router shutdown failed")
        if self.embedded_store is not None:
            self.embedded_store.close()
        self._tokenize_pool.shutdown(wait=False)
        self.tokenizing.close()
        if self.link.key_load is not None:
            await self.link.key_load.close()
