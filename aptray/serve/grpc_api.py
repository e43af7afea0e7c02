"""generate.proto handlers for the ingress (Serve's gRPC proxy calls Ingress.Generate/Abort/Health)."""
from __future__ import annotations

import hmac
import logging
from contextlib import aclosing

import grpc
import numpy as np

from aptray.proto import generate_pb2
from aptray.proto.convert import PLAN_VERSION, logprobs_to_proto
from aptray.serve import choices
from aptray.serve.grpc_registration import Undecoded
from aptray.serve.openai_api import chunk_logprobs, new_id
from aptray.serve.prefix_key import prefix_tag
from aptray.serve.relay import Rejected, invalid_as_400
from aptray.serve.security import grpc_key, identity, key_ok

logger = logging.getLogger("aptray")
# GenerateRequest.version this server speaks (0: unset, taken as 1); 2 adds Sampling's min_p, min_tokens
# and logit_bias, 3 its logprobs, prompt_logprobs and penalties, 4 structured_output and
# repetition_penalty, 5 n, so that a server without them refuses a request that sets them instead of
# ignoring them
API_VERSION = 6
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
           429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def _caller(ingress, ctx) -> str:
    """The caller's identity (security.identity); raises 401 without a valid key where keys are on."""
    keys = ingress.api_keys
    presented = grpc_key(ctx.invocation_metadata() if ctx is not None else None)
    if keys and not key_ok(keys, presented):
        raise Rejected("a valid API key is required (metadata authorization: Bearer <key>)", 401)
    return identity(keys, presented)


def _fail(ingress, ctx, status: int, message: str, retry_after: int | None = None, code=None) -> None:
    ingress.refusals.add("grpc", status)
    if ctx is not None:  # the proxy turns code + details into the call's status
        if status == 429 and retry_after:  # HTTP's Retry-After, in the details: Serve's proxy passes no
            message += f" (retry after {retry_after} s)"  # trailing metadata with an error status
        ctx.set_code(code or _STATUS.get(status, grpc.StatusCode.INTERNAL))
        ctx.set_details(message)


def _refuse_undecoded(ingress, req, ctx) -> None:
    """Raises Rejected for what the proxy could not decode (grpc_registration): INVALID_ARGUMENT, or
    RESOURCE_EXHAUSTED for a message over the size limit, as gRPC's transport answers one."""
    if isinstance(req, Undecoded):
        status = 413 if req.oversize else 400
        _fail(ingress, ctx, status, req.detail, code=grpc.StatusCode.RESOURCE_EXHAUSTED if req.oversize else None)
        raise Rejected(req.detail, status)


def sampling_from_proto(req: generate_pb2.GenerateRequest) -> dict:
    s, slo = req.sampling, req.slo
    opt = lambda msg, name, default: getattr(msg, name) if msg.HasField(name) else default  # noqa: E731
    dec = lambda name, default: _decimal(getattr(s, name)) if s.HasField(name) else default  # noqa: E731
    return {"temperature": dec("temperature", 1.0), "top_p": dec("top_p", 1.0), "top_k": opt(s, "top_k", -1),
            "max_tokens": opt(s, "max_tokens", 16), "stop": list(s.stop), "stop_token_ids": list(s.stop_token_ids),
            "seed": opt(s, "seed", None), "ignore_eos": s.ignore_eos, "min_p": dec("min_p", 0.0),
            "min_tokens": opt(s, "min_tokens", 0), "logit_bias": dict(s.logit_bias),
            "logprobs": opt(s, "logprobs", None), "prompt_logprobs": opt(s, "prompt_logprobs", None),
            "presence_penalty": dec("presence_penalty", 0.0), "frequency_penalty": dec("frequency_penalty", 0.0),
            "structured_output": _structured_output(s.structured_output) if s.HasField("structured_output") else None,
            "repetition_penalty": dec("repetition_penalty", 1.0),
            "skip_special_tokens": opt(s, "skip_special_tokens", True),
            "include_stop_str_in_output": s.include_stop_str_in_output, "cache_salt": opt(s, "cache_salt", None),
            "allowed_token_ids": list(s.allowed_token_ids) or None, "bad_words": list(s.bad_words),
            "ttft_slo": slo.ttft_ms / 1000 if slo.HasField("ttft_ms") else None,
            "tbt_slo": slo.tbt_ms / 1000 if slo.HasField("tbt_ms") else None}


def _decimal(value: float) -> float:
    """A float field's value as the client wrote it: the shortest decimal with that float32 (the field
    holds a float32, so 0.01 arrives as 0.0099999998, below repetition_penalty's floor), as HTTP's
    JSON gives it."""
    return float(str(np.float32(value)))


def _structured_output(so: generate_pb2.StructuredOutput) -> dict | None:
    """StructuredOutput's fields (aptray.structured_output) from its message; kind "" if none is set
    (refused at admission)."""
    kind = so.WhichOneof("kind")
    if kind == "choice":
        return {"kind": "choice", "spec": tuple(so.choice.choices)}
    if kind == "json_object":  # false: no structure
        return {"kind": "json_object"} if so.json_object else None
    return {"kind": {"json_schema": "json"}.get(kind, kind or ""), "spec": getattr(so, kind) if kind else ""}


def _logprobs(entries: list) -> list[generate_pb2.TokenLogprobs]:
    """TokenLogprobs messages of entries (unset where one is None: unknown)."""
    out = []
    for lp in entries:
        out.append(msg := generate_pb2.TokenLogprobs())
        logprobs_to_proto(lp, msg)
    return out


async def generate(ingress, req: generate_pb2.GenerateRequest, ctx):
    _refuse_undecoded(ingress, req, ctx)
    rid = new_id("gen")  # the server's own: a client's id is only a label, echoed back
    label = req.client_request_id
    try:
        owner = _caller(ingress, ctx)
        if req.version > API_VERSION:
            raise Rejected(f"request version {req.version}; this server speaks {API_VERSION}", 400)
        if len(label) > 128:
            raise Rejected("client_request_id is over 128 characters", 400)
        sampling = sampling_from_proto(req)
        async with ingress.link.preparing(owner):  # a key at its cap: refused before its prompt is tokenized
            truncate = req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None
            keep = invalid_as_400(ingress.limits.kept_tokens, truncate)
            if req.WhichOneof("input") == "prompt":
                if len(req.prompt.encode()) > ingress.args.max_body_bytes:
                    raise Rejected(f"the prompt is over {ingress.args.max_body_bytes} bytes", 413)
                [(prompt, ids)] = await ingress.prompts_of(req.prompt, sampling, 1, keep=keep)
            elif req.WhichOneof("input") == "prompt_token_ids":
                [(prompt, ids)] = await ingress.prompts_of(list(req.prompt_token_ids.ids), sampling, 1, keep=keep)
            else:
                raise Rejected("give prompt or prompt_token_ids", 400)
        n = req.n or 1
        if not 1 <= n <= choices.MAX_CHOICES:
            raise Rejected(f"n must be in [1, {choices.MAX_CHOICES}] on this server", 400, "n")
        calls = await ingress.open_choices(rid, [(prompt, ids)], sampling, owner, prefix_tag(req.prefix_key), n)
        async with aclosing(ingress.batches(calls)) as batches:  # closed at once if the call is cancelled
            async for index, batch in batches:  # chunks of one choice that came together: one message
                last = batch[-1]
                reply = generate_pb2.GenerateResponse(request_id=calls[index].rid, client_request_id=label,
                                                      finished=last["finished"], index=index,
                                                      token_ids=[t for c in batch for t in c["token_ids"]],
                                                      text="".join(c["text"] for c in batch))
                if sampling["logprobs"] is not None:
                    reply.logprobs.extend(m for c in batch for m in _logprobs(chunk_logprobs(c)))
                if batch[0].get("prompt_logprobs"):  # the first chunk's
                    reply.prompt_logprobs.extend(_logprobs(batch[0]["prompt_logprobs"]))
                if last["finished"]:
                    reply.finish_reason = last["finish_reason"] or ""
                    reply.usage.prompt_tokens = last["usage"]["prompt_tokens"]
                    reply.usage.completion_tokens = last["usage"]["completion_tokens"]
                    reply.usage.cached_tokens = last["usage"].get("cached_tokens", 0)
                yield reply
    except Rejected as e:
        _fail(ingress, ctx, e.status, str(e), e.retry_after or ingress.args.retry_after_s)
        raise
    except Exception as e:
        logger.exception("gRPC Generate failed")
        _fail(ingress, ctx, 500, f"internal error: {type(e).__name__}")
        raise


async def abort(ingress, req: generate_pb2.AbortRequest, ctx=None) -> generate_pb2.AbortReply:
    """Aborts one of the caller's own requests; another's, or one not relayed here, reads as not found."""
    _refuse_undecoded(ingress, req, ctx)
    try:
        owner = _caller(ingress, ctx)
    except Rejected as e:
        _fail(ingress, ctx, e.status, str(e))
        raise
    call = ingress.link.call(req.request_id)
    if call is None or not hmac.compare_digest(call.owner, owner):
        return generate_pb2.AbortReply(found=False)
    return generate_pb2.AbortReply(found=await ingress.router.abort.remote(req.request_id))


async def health(ingress, req, ctx=None) -> generate_pb2.HealthReply:
    _refuse_undecoded(ingress, req, ctx)
    h = await ingress.router.health.remote()
    return generate_pb2.HealthReply(ok=h["ok"] and not h["draining"], version=PLAN_VERSION, model=ingress.model_name,
                                    waiting=h["waiting"], running=h["running"])
