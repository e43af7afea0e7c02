"""What the request router reads of a request before it picks a replica: its TTFT SLO, an
estimate of its prompt length and the prefix it names (routing_policy.RequestHint). Cheap on
purpose: it runs in Serve's proxy for every request.

What a request router sees in Ray 2.60 (PendingRequest.args) from Serve's proxies is one
argument, bytes that the proxy pickled:
- HTTP: a StreamingHTTPRequest holding the ASGI scope: method, path and headers, not the body
  (the replica pulls the body from the proxy after it was chosen). So the SLO comes from a
  header, `x-aptray-ttft-ms` (clients that set `aptray_slo` in the body send it there too;
  loadgen does), the prompt length from `x-aptray-prompt-tokens` (at most the body's bytes)
  or, without it, from Content-Length (BYTES_PER_TOKEN bytes of JSON per prompt token), and the
  prefix from `x-aptray-prefix-key` (prefix_key.py; its tag, as the replicas report theirs);
- gRPC: a gRPCRequest holding the decoded GenerateRequest: its `slo.ttft_ms`, the length of its
  token ids (or of its prompt text, CHARS_PER_TOKEN characters per token) and its `prefix_key`.
Anything else (a DeploymentHandle call, a GET, a header that is no number) gives None: the
request is routed by Serve's default. The pickles are the proxy's own, never a client's bytes.
"""
from __future__ import annotations

import math
import pickle

from aptray.serve.prefix_key import PREFIX_KEY_HEADER, prefix_tag
from aptray.serve.routing_policy import RequestHint

TTFT_HEADER = b"x-aptray-ttft-ms"
PROMPT_TOKENS_HEADER = b"x-aptray-prompt-tokens"
PREFIX_HEADER = PREFIX_KEY_HEADER.encode()
BYTES_PER_TOKEN = 4  # JSON bytes per prompt token: ~4 characters per BPE token of text, ~5-6 per token id
CHARS_PER_TOKEN = 4
BODY_OVERHEAD = 128  # bytes of a completion body that are not the prompt (max_tokens, sampling, ...)
MAX_TOKENS = 1 << 20  # any larger hint is nonsense: capped
GENERATE_PATHS = (b"/v1/completions", b"/v1/chat/completions")


def hint_of(pending_request, default_ttft_s: float) -> RequestHint | None:
    """The request's hint, or None where it carries none (routed by default)."""
    try:
        args = getattr(pending_request, "args", None)
        if not args or len(args) != 1 or not isinstance(args[0], (bytes, bytearray)):
            return None
        request = pickle.loads(args[0])
        scope = getattr(request, "asgi_scope", None)
        if isinstance(scope, dict):
            return _http_hint(scope, default_ttft_s)
        proto = getattr(request, "user_request_proto", None)
        if proto is not None and hasattr(proto, "slo"):
            return _grpc_hint(proto, default_ttft_s)
    except Exception:  # whatever it is, it is not ours to fail: route it by default
        return None
    return None


def _http_hint(scope: dict, default_ttft_s: float) -> RequestHint | None:
    if scope.get("method") != "POST" or not str(scope.get("path", "")).encode().endswith(GENERATE_PATHS):
        return None
    headers = {k.lower(): v for k, v in scope.get("headers") or () if isinstance(k, bytes)}
    ttft_ms = _number(headers.get(TTFT_HEADER))
    tokens = _number(headers.get(PROMPT_TOKENS_HEADER))
    length = _number(headers.get(b"content-length"))
    if tokens is None:
        tokens = max(1, (length - BODY_OVERHEAD) // BYTES_PER_TOKEN) if length is not None else 1
    elif length is not None:  # no prompt has more tokens than its body has bytes: a claim of more would
        tokens = min(tokens, length)  # make the router believe its replica busier than it is
    return RequestHint(int(min(tokens, MAX_TOKENS)), ttft_ms / 1000 if ttft_ms else default_ttft_s,
                       prefix_tag(headers.get(PREFIX_HEADER)))


def _grpc_hint(proto, default_ttft_s: float) -> RequestHint:
    ttft_ms = proto.slo.ttft_ms if proto.slo.HasField("ttft_ms") else None
    which = proto.WhichOneof("input")
    if which == "prompt_token_ids":
        tokens = len(proto.prompt_token_ids.ids)
    else:
        tokens = len(proto.prompt) // CHARS_PER_TOKEN if which == "prompt" else 1
    ok = ttft_ms is not None and math.isfinite(ttft_ms) and ttft_ms > 0
    return RequestHint(max(1, min(tokens, MAX_TOKENS)), ttft_ms / 1000 if ok else default_ttft_s,
                       prefix_tag(getattr(proto, "prefix_key", "")))


def _number(raw) -> float | None:
    """A positive finite number from a header value, else None."""
    if raw is None:
        return None
    try:
        value = float(raw.decode("latin-1") if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if math.isfinite(value) and value > 0 else None
