"""Edge checks on every HTTP request and gRPC call: API keys and body size.

A pure ASGI middleware: a request without a valid key never reaches a handler, and a body is
read only up to the limit (an oversized one is refused as it streams in). Errors use OpenAI's
shape.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from aptray.sampling_params import check_cache_salt
from aptray.serve.openai_api import error_body

OPEN_PATHS = ("/health",)  # probes carry no key
# what a request's headers may add up to (nginx refuses past 32 KB by default): a client must not make
# every replica hold megabytes of headers per request
MAX_HEADER_BYTES = 64 << 10


def key_ok(keys: frozenset[str], presented: str | None) -> bool:
    """Constant-time comparison against every accepted key; no keys configured: open."""
    if not keys:
        return True
    if not presented:
        return False
    ok = False
    for k in keys:  # no early exit: timing does not say which key (or how much of it) matched
        ok |= hmac.compare_digest(k.encode(), presented.encode())
    return ok


def identity(keys: frozenset[str], presented: str | None) -> str:
    """Who a caller is, for ownership of its requests: a digest of its key ("" when keys are off)."""
    if not keys or not presented:
        return ""
    return hashlib.sha256(presented.encode()).hexdigest()[:32]


def key_salt(owner: str, salt: str | None) -> str:
    """The cache_salt of a request of owner (an identity) that sent salt: its own prefix cache (a
    digest where the client sent a salt too, so that it stays within MAX_CACHE_SALT). InvalidRequest
    where the client's salt is not one."""
    check_cache_salt(salt)
    return f"key:{owner}" if salt is None else "key:" + hashlib.sha256(f"{owner}|{salt}".encode()).hexdigest()


def bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return value.strip() if value else None


def grpc_key(metadata) -> str | None:
    """The key a gRPC call presents: `authorization: Bearer <key>` or `x-api-key: <key>`; None for none
    or more than one."""
    presented = [bearer(v) if k.lower() == "authorization" else v for k, v in metadata or ()
                 if k.lower() in ("authorization", "x-api-key")]
    return presented[0] if len(presented) == 1 else None  # two keys: which is the caller's is not clear


async def _send_error(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(message, status)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class EdgeMiddleware:
    """431 over MAX_HEADER_BYTES of headers, 400 for two Authorization headers, 401 without a valid key
    (except OPEN_PATHS), 413 over max_body_bytes, 408 for a body not received within body_timeout_s."""

    def __init__(self, app, settings: dict):
        """settings: "keys", "max_body" (bytes) and "body_timeout" (s), read at each request: the ingress
        sets them from its args after the app is built."""
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("headers", [])
        if sum(len(k) + len(v) for k, v in raw) > MAX_HEADER_BYTES:
            return await _send_error(send, 431, f"the request's headers are over {MAX_HEADER_BYTES} bytes")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        if sum(k.lower() == b"authorization" for k, _ in raw) > 1:
            return await _send_error(send, 400, "send one Authorization header")
        keys = self.settings["keys"]
        if scope.get("path") not in OPEN_PATHS and not key_ok(keys, bearer(headers.get("authorization"))):
            return await _send_error(send, 401, "a valid API key is required (Authorization: Bearer <key>)",
                                     [(b"www-authenticate", b"Bearer")])
        limit = self.settings["max_body"]
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await _send_error(send, 400, "malformed Content-Length")
        if limit and declared > limit:
            return await _send_error(send, 413, f"the request body is over {limit} bytes")
        # read the body up to the limit before the app sees it (bounded buffering): a body that
        # goes over is refused here, not half-parsed by a handler
        chunks, received, deadline = [], 0, self.settings["body_timeout"]
        try:
            async with asyncio.timeout(deadline):
                while True:
                    msg = await receive()
                    if msg["type"] != "http.request":
                        return  # the client went away
                    chunks.append(msg.get("body", b""))
                    received += len(chunks[-1])
                    if (limit and received > limit) or not msg.get("more_body", False):
                        break
        except TimeoutError:
            return await _send_error(send, 408, f"the request body did not arrive within {deadline:g} s")
        if limit and received > limit:  # answered outside the deadline: a slow reader gets its 413 whole
            return await _send_error(send, 413, f"the request body is over {limit} bytes")
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then disconnects, for streaming responses

        await self.app(scope, replay, send)
