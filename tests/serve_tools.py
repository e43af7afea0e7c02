"""A served aptray app for the tests: Serve's HTTP and gRPC proxies on free local ports."""
from __future__ import annotations

from contextlib import contextmanager

import ray
import ray.serve as serve

from aptray.serve.grpc_registration import SERVICER_FUNCTION  # its message limit: conftest.py
from aptray.worker.shard import free_port


def start_proxies() -> dict:
    """serve.start with HTTP and the generate.proto gRPC servicer; returns their addresses."""
    from ray.serve.config import gRPCOptions

    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]))
    return {"http": f"http://127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}


@contextmanager
def served_app(args: dict, num_cpus: int):
    """A Ray instance of its own, the proxies, and build_app(args) as the app "aptray" at "/"."""
    from aptray.app import build_app

    ray.init(include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    try:
        addresses = start_proxies()
        serve.run(build_app(args), name="aptray", route_prefix="/")
        yield addresses
    finally:
        serve.shutdown()
        ray.shutdown()
