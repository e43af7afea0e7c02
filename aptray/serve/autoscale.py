"""GoodputPolicy: a Serve autoscaling policy on SLO attainment and predicted TTFT headroom.

Serve's default scales on ongoing requests per replica, which says nothing of whether requests
meet their SLOs: ten cheap requests and ten long prompts count alike. Each aptray replica reports
(Ingress.record_autoscaling_stats, averaged by Serve over look_back_period_s):
- aptray_attained, aptray_ended: requests that met their SLO, and all that ended (finished,
  failed or refused), over the replica's last window;
- aptray_ttft_pressure: a typical request's predicted TTFT there over its TTFT SLO (1: just meets it).

The policy wants more replicas when attainment is below target or the mean pressure above
`upscale_pressure` (as many more as the pressure says: n x pressure / target_pressure, at least
one); one fewer when attainment is met and the pressure is under `downscale_pressure`, or when
too few requests ended lately to judge attainment and the pressure is not high (a quiet
deployment: the pressure of an idle replica is its bare prefill over the SLO, which fewer replicas
do not change). Serve applies min/max_replicas and the upscale and downscale delays to what it
returns. Before any replica reports, it defers to Serve's default.
"""
from __future__ import annotations

import math


class GoodputPolicy:
    def __init__(self, target_attainment: float = 0.9, upscale_pressure: float = 0.8,
                 downscale_pressure: float = 0.3, min_ended: int = 20):
        """min_ended: fewer ended requests than this in the window say nothing of attainment."""
        self.target_attainment = target_attainment
        self.upscale_pressure = upscale_pressure
        self.downscale_pressure = downscale_pressure
        self.target_pressure = (upscale_pressure + downscale_pressure) / 2
        self.min_ended = min_ended

    def __call__(self, ctx):
        n = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        pressure = metrics.get("aptray_ttft_pressure") or {}
        if n == 0 or not pressure:
            from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
            return replica_queue_length_autoscaling_policy(ctx)
        return self.desired(n, list(pressure.values()), sum((metrics.get("aptray_attained") or {}).values()),
                            sum((metrics.get("aptray_ended") or {}).values())), {}

    def desired(self, n: int, pressures: list[float], attained: float, ended: float) -> int:
        """Replicas wanted, from the replicas' pressures and their attained / ended requests."""
        mean = sum(pressures) / len(pressures)
        known = ended >= self.min_ended
        if (known and attained / ended < self.target_attainment) or mean > self.upscale_pressure:
            return max(n + 1, math.ceil(n * min(mean, 10.0) / self.target_pressure))
        if not known:  # quiet
            return max(n - 1, 1)
        if mean < self.downscale_pressure:
            return max(n - 1, math.ceil(n * mean / self.target_pressure), 1)
        return n
