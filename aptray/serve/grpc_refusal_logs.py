"""Keeps Serve from logging a traceback for each gRPC call aptray refuses on purpose.

A streaming gRPC method gets a status other than OK only by raising (Serve's proxy takes the code the
handler set only with an exception: ray/serve/_private/replica.py, _maybe_wrap_grpc_exception), and Serve
logs every such exception with its traceback at ERROR twice: in the replica ("Request failed.") and in
the proxy ("Request failed with user-set gRPC status code ..."). For a refusal (a relay.Rejected under
500: a bad request, a missing key, a shed request) that is noise, one traceback pair per 429 under
overload; the ingress counts those in aptray_refused_requests_total instead. This filter on Serve's
logger drops those records in the process it is installed in, and keeps every other (5xx included).
"""
from __future__ import annotations

import logging

from aptray.serve.relay import Rejected

SERVE_LOGGER = "ray.serve"  # ray.serve._private.constants.SERVE_LOGGER_NAME


def is_refusal(exc: BaseException | None) -> bool:
    """Whether exc is, or wraps, a client error aptray answered (Rejected under 500): as raised in the
    replica, wrapped by Serve (gRPCStatusError's original_exception) or shipped by Ray (RayTaskError's
    cause)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, Rejected):
            return exc.status < 500
        exc = (getattr(exc, "original_exception", None) or getattr(exc, "cause", None) or exc.__cause__
               or exc.__context__)
        seen += 1
    return False


class QuietRefusals(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_refusal(record.exc_info[1]))


def install() -> None:
    """Puts the filter on Serve's logger of this process, once."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, QuietRefusals) for f in serve_logger.filters):
        serve_logger.addFilter(QuietRefusals())
