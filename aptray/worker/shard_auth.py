"""The shard service's one secret: a router hands it to its shards at start, and every call to a
shard must carry it, so that nothing else on the cluster network can send Plan() (write cache
blocks, desynchronise the ranks' collectives) or read Info()."""
from __future__ import annotations

import hmac

import grpc

SECRET_METADATA = "x-aptray-shard-secret"


def _refuse(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "this shard serves its own router only")


class SecretCheck(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the secret (constant-time comparison)."""

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("a shard needs its router's secret")
        self._secret = secret.encode()
        self._deny = grpc.unary_unary_rpc_method_handler(_refuse)

    def intercept_service(self, continuation, handler_call_details):
        presented = dict(handler_call_details.invocation_metadata or ()).get(SECRET_METADATA, "")
        if hmac.compare_digest(presented.encode(), self._secret):
            return continuation(handler_call_details)
        return self._deny
