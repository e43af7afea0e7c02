"""The Ingress deployment's Serve options from AppArgs: replicas or autoscaling, and the request router.

build_app applies them, so `serve run aptray.app:build_app routing=slo max_replicas=4`, the Serve
config file's `args` and the KubeRay manifests' serveConfigV2 all configure the same thing.
"""
from __future__ import annotations

from aptray.serve.args import AppArgs

ROUTER_CLASS = "aptray.serve.slo_router:SloRouter"
POLICY = "aptray.serve.autoscale:GoodputPolicy"
# Serve averages them over this; replicas push them every 10 s (Serve's metric push interval), and
# Serve wants the window longer than that: two pushes
LOOK_BACK_S = 20.0
ATTAINMENT_WINDOW_S = 30.0  # each replica's attainment: of the requests that ended this long back


def deployment_options(args: AppArgs) -> dict:
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    router = {"request_routing_stats_period_s": args.routing_stats_period_s,
              # a replica's stats call that takes longer than this is given up (and retried)
              "request_routing_stats_timeout_s": max(5.0, 4 * args.routing_stats_period_s)}
    if args.routing == "slo":
        router.update(request_router_class=ROUTER_CLASS, request_router_kwargs={
            "default_ttft_slo_ms": args.ttft_slo_ms, "stale_after_s": args.routing_stale_after_s,
            "equal_ttft_fraction": args.routing_equal_ttft_fraction})
    options = {"request_router_config": RequestRouterConfig(**router)}
    if args.max_replicas is None:
        return {**options, "num_replicas": args.num_replicas}
    low = args.min_replicas or 1
    policy = AutoscalingPolicy(policy_function=POLICY, policy_kwargs={"target_attainment": args.target_attainment})
    options["autoscaling_config"] = AutoscalingConfig(
        min_replicas=low, max_replicas=args.max_replicas,
        initial_replicas=min(max(args.num_replicas, low), args.max_replicas),
        upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
        look_back_period_s=LOOK_BACK_S, policy=policy)
    return options
