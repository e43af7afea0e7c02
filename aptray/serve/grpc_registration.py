"""generate.proto's service as Serve's gRPC proxy registers it: grpc_options.grpc_servicer_functions names
SERVICER_FUNCTION (deploy/serve_config.yaml, k8s/, tests/serve_tools.py).

Serve's proxy keeps the request_deserializer of the handlers a servicer function registers and replaces only
what they run (ray/serve/_private/grpc_util.py, gRPCGenericServer._override_method_handler), so it decodes
every request with the deserializers registered here. The generated ones raise DecodeError on bytes that
are no message (truncated, invalid UTF-8 in a string field), which grpc answers UNKNOWN; these return an
Undecoded instead, which the proxy hands to the ingress like any request and the ingress answers
INVALID_ARGUMENT (grpc_api).

Message size: Serve's gRPC server accepts messages up to RAY_SERVE_GRPC_MAX_MESSAGE_SIZE bytes (2 GiB
unless that env var is set in the Ray processes: Serve has no config field for it), so aptray's configs set
it to GRPC_MAX_MESSAGE_BYTES and the transport refuses larger ones with RESOURCE_EXHAUSTED before they are
read whole. Where it was not set, these deserializers still refuse them (RESOURCE_EXHAUSTED, from the
ingress) before decoding: the costly part is the decoded message, which the proxy pickles to the ingress.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from aptray.proto import generate_pb2_grpc
from aptray.serve import grpc_refusal_logs

logger = logging.getLogger("aptray")

SERVICER_FUNCTION = "aptray.serve.grpc_registration.add_GenerationServicer_to_server"
MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # ray.serve._private.constants reads it at import
# gRPC's own default receive limit. The largest request aptray serves is well under it: a prompt of
# max_body_bytes (1 MiB) of text, or of the longest context's token ids, with every other field at its
# admission limit (65,536 allowed token ids, 64 bad words, a 65,536-character structured output) is under
# 2 MiB. The env var sets the proxy's send limit too: the largest reply, the first message with 20
# prompt_logprobs a token, is about 160 bytes a prompt token (1.3 MiB at an 8,192-token context).
GRPC_MAX_MESSAGE_BYTES = 4 << 20


@dataclass(frozen=True)
class Undecoded:
    """What the proxy hands to the ingress in place of a request it could not decode (or would not)."""
    detail: str
    oversize: bool = False  # over the size limit: RESOURCE_EXHAUSTED, as the transport answers


def max_message_bytes() -> int:
    """The message size limit of this process's Serve gRPC server: the env var, else aptray's."""
    raw = os.environ.get(MAX_MESSAGE_ENV)
    return int(raw) if raw else GRPC_MAX_MESSAGE_BYTES


def tolerant(deserializer, limit: int):
    """deserializer, answering an Undecoded where it raises DecodeError or the message is over limit."""
    def deserialize(raw: bytes):
        if len(raw) > limit:
            return Undecoded(f"the message is {len(raw)} bytes, over this server's limit of {limit}", True)
        try:
            return deserializer(raw)
        except DecodeError as e:
            return Undecoded(f"the request could not be decoded: {e}")
    return deserialize


def _tolerant_handler(handler: grpc.RpcMethodHandler, limit: int) -> grpc.RpcMethodHandler:
    if handler.request_deserializer is None:
        return handler
    return handler._replace(request_deserializer=tolerant(handler.request_deserializer, limit))


class _TolerantServer:
    """The server as the generated add_*_to_server sees it: handlers get tolerant deserializers on their way."""

    def __init__(self, server, limit: int):
        self._server, self._limit = server, limit

    def add_generic_rpc_handlers(self, generic_handlers):
        for generic in generic_handlers:  # DictionaryGenericHandler; Serve's proxy reads the same attribute
            generic._method_handlers = {name: _tolerant_handler(h, self._limit)
                                        for name, h in generic._method_handlers.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict):
        self._server.add_registered_method_handlers(
            service, {name: _tolerant_handler(h, self._limit) for name, h in handlers.items()})


def add_GenerationServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated function's name)
    """The generated registration, with tolerant deserializers."""
    limit = max_message_bytes()
    if MAX_MESSAGE_ENV not in os.environ:
        logger.warning("%s is not set in this process: its gRPC server receives messages up to 2 GiB, and "
                       "aptray refuses those over %d bytes only once received (docs/SERVING.md)",
                       MAX_MESSAGE_ENV, limit)
    grpc_refusal_logs.install()  # this is Serve's proxy process: no traceback for each refusal
    generate_pb2_grpc.add_GenerationServicer_to_server(servicer, _TolerantServer(server, limit))
