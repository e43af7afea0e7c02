"""The ingress's endpoints besides generation's (ingress.py has completions and chat): OpenAI's
Responses API, vLLM's /tokenize and /detokenize, the model list, /version, /health and /metrics.
A mixin of Ingress, whose state and shared path (open_chat, _collect, chunks, _reject) they use;
Serve binds a base class's routes as the deployment's own.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray.exceptions import RayActorError

from aptray.serve import routing_counts
from aptray.serve.http_app import api
from aptray.serve.openai_api import (DetokenizeRequest, ModelCard, ModelList, TokenizeChatRequest,
                                     TokenizeCompletionRequest, error_body)
from aptray.serve.relay import Call, Rejected
from aptray.serve.responses_api import ResponseEvents, ResponsesRequest, in_responses_terms, response_body

logger = logging.getLogger("aptray")
STATS_TIMEOUT_S = 2.0  # a router slower than this to report its load reports nothing this round


class ServiceRoutes:
    @api.post("/v1/responses")
    async def responses(self, req: ResponsesRequest, raw: Request):
        """OpenAI's Responses API, stateless (aptray.serve.responses_api): a chat completion of the input."""
        try:
            chat = req.chat_request()  # its own refusals name its own fields already
        except Rejected as e:
            return self._reject(e)
        try:
            _, _, rid, [call] = await self.open_chat(chat, raw, "resp")
        except Rejected as e:
            return self._reject(in_responses_terms(e, req))
        if req.stream:
            return StreamingResponse(self._response_sse(call, ResponseEvents(rid, self.model_name, req)),
                                     media_type="text/event-stream")
        try:
            [reply] = await self._collect([call])
        except Rejected as e:
            return self._reject(e)
        return response_body(rid, self.model_name, req, int(time.time()), reply.text, reply.last["finish_reason"],
                             reply.last["usage"])

    async def _response_sse(self, call: Call, events: ResponseEvents):
        yield events.opening()
        try:
            async with aclosing(self.chunks(call)) as batches:  # closed at once if the client goes
                async for batch in batches:
                    yield events.render(batch)
        except Rejected as e:
            yield events.error(str(e), e.status)
        except Exception as e:  # headers are sent: an error event is all a client can still get
            logger.exception("stream failed")
            yield events.error(f"internal error: {type(e).__name__}", 500)

    @api.post("/tokenize")
    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest, raw: Request):
        """vLLM's: a prompt's token ids, or a conversation's through the chat template (no generation)."""
        try:
            self._check_served(req.model)
            return await self.tokenizing.tokenize(req, self.caller(raw))
        except Rejected as e:
            return self._reject(e)

    @api.post("/detokenize")
    async def detokenize(self, req: DetokenizeRequest, raw: Request):
        """vLLM's: the text of token ids."""
        try:
            self._check_served(req.model)
            return await self.tokenizing.detokenize(req.tokens, self.caller(raw))
        except Rejected as e:
            return self._reject(e)

    @api.get("/v1/models")
    async def models(self):
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str):
        """OpenAI's retrieve: the served model's card, 404 for any other."""
        try:
            self._check_served(model)
        except Rejected as e:
            return self._reject(e)
        return ModelCard(id=self.model_name, max_model_len=self.max_model_len)

    @api.get("/version")
    async def version(self):
        """aptray's version (vLLM's /version)."""
        return {"version": importlib.metadata.version("aptray")}

    @api.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' probes
    async def health(self):
        try:
            h = await self.router.health.remote()
        except RayActorError:
            return _restarting()
        h["router_restarts"] = self.link.restarts
        ok = h["ok"] and not h["draining"]
        return JSONResponse(h, status_code=200 if ok else 503)

    @api.get("/metrics")
    async def metrics(self):
        try:
            text = await self.router.metrics_text.remote()
        except RayActorError:
            return _restarting()
        text += self.refusals.prometheus_text()
        text += (f"# HELP aptray_router_restarts_total routers this replica replaced\n"
                 f"# TYPE aptray_router_restarts_total counter\n"
                 f"aptray_router_restarts_total {self.link.restarts}\n").encode()
        try:  # from Ray's GCS: off the event loop, and never what fails /metrics
            routed = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, routing_counts.totals, self.app_name), STATS_TIMEOUT_S)
            text += routing_counts.prometheus_text(routed).encode()
        except Exception:
            logger.warning("routing counts unavailable", exc_info=True)
        return Response(text, media_type=CONTENT_TYPE_LATEST)


def _restarting() -> JSONResponse:
    return JSONResponse(error_body("the router is restarting", 503), status_code=503)
