"""Ingress: the Ray Serve deployment clients talk to (OpenAI HTTP + aptray gRPC).

It validates and tokenizes, asks its Router for admission, and relays token chunks. Each
ingress replica owns one Router actor (and through it the shards): replicas are data-parallel.
"""

import asyncio
import json
import logging
import os

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from aptray.serve import grpc_api
from aptray.serve.args import AppArgs
from aptray.serve.openai_api import (ChatChoice, ChatChoiceMessage, ChatChunkChoice, ChatCompletionChunk,
                                     ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
                                     CompletionChoice, CompletionRequest, CompletionResponse, ModelCard,
                                     ModelList, Usage, error_body, finish_reason, new_id)
from aptray.serve.router import Router, resolve_model

logger = logging.getLogger("aptray")
api = FastAPI(title="aptray")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    # malformed JSON and schema errors alike: 422 in OpenAI's error shape
    return JSONResponse(error_body(str(exc.errors()[:3]), 422), status_code=422)


class Rejected(Exception):
    def __init__(self, message: str, status: int, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def __reduce__(self):  # Ray ships exceptions by pickle: keep status and param
        return Rejected, (str(self), self.status, self.param)


def _usage(chunk: dict) -> Usage:
    u = chunk["usage"]
    return Usage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                 total_tokens=u["prompt_tokens"] + u["completion_tokens"])


def _sse(obj) -> str:
    body = obj.model_dump_json(exclude_none=False) if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {body}\n\n"


@serve.deployment(name="Ingress", max_ongoing_requests=1024, graceful_shutdown_timeout_s=30,
                  ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict | None = None):
        from transformers import AutoTokenizer

        self.args = AppArgs.parse(args)
        model, _ = resolve_model(self.args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.args.tokenizer or model)
        self.model_name = self.args.served_model_name or os.path.basename(model.rstrip("/"))
        # num_cpus=0: the router mostly waits on shards; it must not take a CPU a shard needs
        self.router = ray.remote(Router).options(num_cpus=0, max_concurrency=10_000).remote(dict(args or {}))
        info = ray.get(self.router.ready.remote())
        self.max_model_len = info["max_model_len"]
        logger.info("ingress ready: %s, %d blocks, store %s", self.model_name, info["num_blocks"], info["store"])

    # -- shared path --------------------------------------------------------------------------
    async def open_stream(self, rid: str, ids: list[int], sampling: dict, prompt: str | None):
        """Admission: returns the router's chunk generator once the request is accepted."""
        gen = self.router.generate.options(num_returns="streaming").remote(rid, ids, sampling, prompt)
        first = await (await gen.__anext__())
        if "error" in first:
            raise Rejected(first["error"], first["status"], first.get("param"))
        return gen

    async def chunks(self, rid: str, gen):
        """Token chunks until finished; a caller that stops early (disconnect) aborts the request."""
        finished = False
        try:
            async for ref in gen:
                chunk = await ref
                if "error" in chunk:
                    raise Rejected(chunk["error"], chunk.get("status", 500))
                finished = chunk["finished"]
                yield chunk
        finally:
            if not finished:
                self.router.abort.remote(rid)  # fire and forget: we may be inside a cancellation

    def _reject(self, e: Rejected) -> JSONResponse:
        headers = {"Retry-After": str(self.args.retry_after_s)} if e.status == 429 else None
        return JSONResponse(error_body(str(e), e.status, e.param), status_code=e.status, headers=headers)

    def sampling(self, req, max_tokens: int) -> dict:
        slo = req.aptray_slo
        return {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
                "max_tokens": max_tokens, "stop": req.stop, "stop_token_ids": req.stop_token_ids or [],
                "seed": req.seed, "ignore_eos": req.ignore_eos,
                "ttft_slo": slo.ttft_ms / 1000 if slo and slo.ttft_ms else None,
                "tbt_slo": slo.tbt_ms / 1000 if slo and slo.tbt_ms else None}

    def _check_model(self, req) -> None:
        if req.model not in (None, "", self.model_name):
            raise Rejected(f"model {req.model!r} is not served here; this server has {self.model_name!r}", 404,
                           "model")
        if req.n != 1:
            raise Rejected("n > 1 is not supported", 400, "n")

    # -- OpenAI HTTP --------------------------------------------------------------------------
    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        try:
            self._check_model(req)
            prompt, ids = self._completion_prompt(req.prompt)
            rid = new_id("cmpl")
            gen = await self.open_stream(rid, ids, self.sampling(req, req.max_tokens or 16), prompt)
        except Rejected as e:
            return self._reject(e)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_sse(rid, gen, include_usage), media_type="text/event-stream")
        text, last = "", None
        try:
            async for chunk in self.chunks(rid, gen):
                text, last = text + chunk["text"], chunk
        except Rejected as e:
            return self._reject(e)
        return CompletionResponse(id=rid, model=self.model_name, usage=_usage(last), choices=[
            CompletionChoice(text=(prompt or "") + text if req.echo else text,
                             finish_reason=finish_reason(last["finish_reason"]))])

    def _completion_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise Rejected("give one prompt per request (a string or a list of token ids)", 400, "prompt")

    async def _completion_sse(self, rid: str, gen, include_usage: bool):
        try:
            async for chunk in self.chunks(rid, gen):
                reason = finish_reason(chunk["finish_reason"]) if chunk["finished"] else None
                yield _sse(CompletionResponse(id=rid, model=self.model_name, choices=[
                    CompletionChoice(text=chunk["text"], finish_reason=reason)]))
                if chunk["finished"] and include_usage:
                    yield _sse(CompletionResponse(id=rid, model=self.model_name, choices=[], usage=_usage(chunk)))
        except Rejected as e:
            yield _sse(error_body(str(e), e.status))
        yield "data: [DONE]\n\n"

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        try:
            self._check_model(req)
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            max_tokens = req.max_completion_tokens or req.max_tokens or max(1, self.max_model_len - len(ids))
            rid = new_id("chatcmpl")
            gen = await self.open_stream(rid, ids, self.sampling(req, max_tokens), text)
        except Rejected as e:
            return self._reject(e)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_sse(rid, gen, include_usage), media_type="text/event-stream")
        content, last = "", None
        try:
            async for chunk in self.chunks(rid, gen):
                content, last = content + chunk["text"], chunk
        except Rejected as e:
            return self._reject(e)
        return ChatCompletionResponse(id=rid, model=self.model_name, usage=_usage(last), choices=[
            ChatChoice(message=ChatChoiceMessage(content=content), finish_reason=finish_reason(last["finish_reason"]))])

    async def _chat_sse(self, rid: str, gen, include_usage: bool):
        yield _sse(ChatCompletionChunk(id=rid, model=self.model_name,
                                       choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))]))
        try:
            async for chunk in self.chunks(rid, gen):
                reason = finish_reason(chunk["finish_reason"]) if chunk["finished"] else None
                yield _sse(ChatCompletionChunk(id=rid, model=self.model_name, choices=[
                    ChatChunkChoice(delta=ChatDelta(content=chunk["text"]), finish_reason=reason)]))
                if chunk["finished"] and include_usage:
                    yield _sse(ChatCompletionChunk(id=rid, model=self.model_name, choices=[], usage=_usage(chunk)))
        except Rejected as e:
            yield _sse(error_body(str(e), e.status))
        yield "data: [DONE]\n\n"

    @api.get("/v1/models")
    async def models(self):
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    @api.get("/health")
    async def health(self):
        h = await self.router.health.remote()
        ok = h["ok"] and not h["draining"]
        return JSONResponse(h, status_code=200 if ok else 503)

    @api.get("/metrics")
    async def metrics(self):
        return Response(await self.router.metrics_text.remote(), media_type=CONTENT_TYPE_LATEST)

    # -- gRPC (through Serve's gRPC proxy; method names match generate.proto) ------------------
    async def Generate(self, request, grpc_context=None):
        async for reply in grpc_api.generate(self, request, grpc_context):
            yield reply

    async def Abort(self, request, grpc_context=None):
        return await grpc_api.abort(self, request)

    async def Health(self, request, grpc_context=None):
        return await grpc_api.health(self, request)

    # -- lifecycle ----------------------------------------------------------------------------
    async def check_health(self):
        h = await asyncio.wait_for(self.router.health.remote(), timeout=30)
        if not h["ok"]:
            raise RuntimeError(f"router unhealthy: {h['error'] or 'engine thread is dead'}")

    async def __del__(self):
        # Serve has drained this replica's requests by now; let the router finish stragglers,
        # then release the shards and their placement group before the actors go
        try:
            await self.router.drain.remote(self.args.drain_timeout_s)
            await self.router.shutdown.remote()
            ray.kill(self.router)
        except Exception:
            logger.exception("router shutdown failed")
