"""Routing decisions counted where they are made (each request router, in each Serve proxy or
handle) and read where /metrics is served (any ingress replica).

A request router has no channel to the replicas' /metrics, so each one publishes its cumulative
counts (reason -> requests) in Ray's GCS key-value store every FLUSH_S, under a key of its own;
/metrics sums every key of the app. Counts are thus up to FLUSH_S old, and those of a router
whose process is gone stay as they were (cumulative counters).
"""
from __future__ import annotations

import json
import logging

logger = logging.getLogger("aptray")

NAMESPACE = "aptray"
FLUSH_S = 1.0


def key_prefix(app_name: str) -> str:
    return f"routing:{app_name}:"


def publish(app_name: str, router_id: str, counts: dict) -> None:
    """Store one router's cumulative counts (blocking: call off the event loop)."""
    from ray.experimental.internal_kv import _internal_kv_put
    _internal_kv_put(key_prefix(app_name) + router_id, json.dumps(counts), overwrite=True, namespace=NAMESPACE)


def totals(app_name: str) -> dict:
    """reason -> requests routed, over every router of the app (blocking: call off the event loop)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized, _internal_kv_list
    out: dict[str, int] = {}
    if not _internal_kv_initialized():
        return out
    for key in _internal_kv_list(key_prefix(app_name), namespace=NAMESPACE):
        try:
            counts = json.loads(_internal_kv_get(key, namespace=NAMESPACE) or b"{}")
        except ValueError:
            continue
        for reason, n in counts.items():
            if isinstance(n, int):
                out[reason] = out.get(reason, 0) + n
    return out


def prometheus_text(counts: dict) -> str:
    lines = ["# HELP aptray_routed_requests_total requests routed to a replica, by why (all request routers of the app)",
             "# TYPE aptray_routed_requests_total counter"]
    lines += [f'aptray_routed_requests_total{{reason="{reason}"}} {n}' for reason, n in sorted(counts.items())]
    return "\n".join(lines) + "\n"
