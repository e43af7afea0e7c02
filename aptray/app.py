"""The Serve application: `serve run aptray.app` (embedded defaults) or `aptray.app:build_app` with args."""
from __future__ import annotations

from aptray.serve.args import AppArgs
from aptray.serve.deploy_options import deployment_options
from aptray.serve.ingress import Ingress


def build_app(args: dict | None = None):
    """Serve application builder: args are AppArgs fields (model, tensor_parallel_size, scheduler,
    cache_mode, ttft_slo_ms, tbt_slo_ms, redis_url, max_queue, num_replicas, routing, ...)."""
    parsed = AppArgs.parse(args)  # fail at deploy time on unknown or malformed args
    return Ingress.options(**deployment_options(parsed)).bind(dict(args or {}))


app = build_app({})
