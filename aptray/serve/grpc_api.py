"""generate.proto handlers for the ingress (Serve's gRPC proxy calls Ingress.Generate/Abort/Health)."""
from __future__ import annotations

import logging
from contextlib import aclosing

import grpc

from aptray.proto import generate_pb2
from aptray.proto.convert import PLAN_VERSION
from aptray.serve.openai_api import new_id
from aptray.serve.relay import Rejected
from aptray.serve.security import grpc_key, key_ok

logger = logging.getLogger("aptray")
API_VERSION = 1  # GenerateRequest.version this server speaks (0: unset, taken as 1)
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
           429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def _check_key(ingress, ctx) -> None:
    keys = ingress.args.api_key_set()
    if keys and not key_ok(keys, grpc_key(ctx.invocation_metadata() if ctx is not None else None)):
        raise Rejected("a valid API key is required (metadata authorization: Bearer <key>)", 401)


def _fail(ctx, status: int, message: str) -> None:
    if ctx is not None:  # the proxy turns code + details into the call's status
        ctx.set_code(_STATUS.get(status, grpc.StatusCode.INTERNAL))
        ctx.set_details(message)


def sampling_from_proto(req: generate_pb2.GenerateRequest) -> dict:
    s, slo = req.sampling, req.slo
    opt = lambda msg, name, default: getattr(msg, name) if msg.HasField(name) else default  # noqa: E731
    return {"temperature": opt(s, "temperature", 1.0), "top_p": opt(s, "top_p", 1.0), "top_k": opt(s, "top_k", -1),
            "max_tokens": opt(s, "max_tokens", 16), "stop": list(s.stop), "stop_token_ids": list(s.stop_token_ids),
            "seed": opt(s, "seed", None), "ignore_eos": s.ignore_eos,
            "ttft_slo": slo.ttft_ms / 1000 if slo.HasField("ttft_ms") else None,
            "tbt_slo": slo.tbt_ms / 1000 if slo.HasField("tbt_ms") else None}


async def generate(ingress, req: generate_pb2.GenerateRequest, ctx):
    rid = req.request_id or new_id("gen")
    try:
        _check_key(ingress, ctx)
        if req.version > API_VERSION:
            raise Rejected(f"request version {req.version}; this server speaks {API_VERSION}", 400)
        if len(req.request_id) > 128:
            raise Rejected("request_id is over 128 characters", 400)
        if req.WhichOneof("input") == "prompt":
            if len(req.prompt.encode()) > ingress.args.max_body_bytes:
                raise Rejected(f"the prompt is over {ingress.args.max_body_bytes} bytes", 413)
            prompt, ids = req.prompt, ingress.tokenizer.encode(req.prompt)
        elif req.WhichOneof("input") == "prompt_token_ids":
            prompt, ids = None, list(req.prompt_token_ids.ids)
        else:
            raise Rejected("give prompt or prompt_token_ids", 400)
        call = await ingress.open_stream(rid, ids, sampling_from_proto(req), prompt)
        async with aclosing(ingress.chunks(call)) as batches:  # closed at once if the call is cancelled
            async for batch in batches:  # chunks that came together: one message
                last = batch[-1]
                reply = generate_pb2.GenerateResponse(request_id=rid, finished=last["finished"],
                                                      token_ids=[t for c in batch for t in c["token_ids"]],
                                                      text="".join(c["text"] for c in batch))
                if last["finished"]:
                    reply.finish_reason = last["finish_reason"] or ""
                    reply.usage.prompt_tokens = last["usage"]["prompt_tokens"]
                    reply.usage.completion_tokens = last["usage"]["completion_tokens"]
                yield reply
    except Rejected as e:
        _fail(ctx, e.status, str(e))
        raise
    except Exception as e:
        logger.exception("gRPC Generate failed")
        _fail(ctx, 500, f"internal error: {type(e).__name__}")
        raise


async def abort(ingress, req: generate_pb2.AbortRequest, ctx=None) -> generate_pb2.AbortReply:
    try:
        _check_key(ingress, ctx)
    except Rejected as e:
        _fail(ctx, e.status, str(e))
        raise
    return generate_pb2.AbortReply(found=await ingress.router.abort.remote(req.request_id))


async def health(ingress, req) -> generate_pb2.HealthReply:
    h = await ingress.router.health.remote()
    return generate_pb2.HealthReply(ok=h["ok"] and not h["draining"], version=PLAN_VERSION, model=ingress.model_name,
                                    waiting=h["waiting"], running=h["running"])
