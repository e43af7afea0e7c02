"""The scheduler's own time per step, charged to the simulated clock, per policy.

A step waits for its plan: the engine calls schedule() on the host, then runs the step, and apt's
decisions cost more than fcfs's (a greedy over the queue, numpy per request), which one constant
for every policy (--step-overhead) would not show. So each simulated step also costs the decision
time of the policy that made it, from a profile measured on a real host by
`python -m loadgen.decision_profile` (aptray/sim/data/decision_time.json): per policy, a least-squares
line of decision seconds over the requests waiting and running once the decision is made,
    seconds = c0 + per_waiting * waiting + per_running * running,
fitted to the mean of measured decisions (GC frozen after start-up, as the server runs). A stored
profile, not a live timing: a simulated run stays deterministic and does not depend on what else
the simulating machine is doing. `scale` prices a host CPU faster (< 1) or slower (> 1) than the
one the profile was measured on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

PROFILE_PATH = os.path.join(os.path.dirname(__file__), "data", "decision_time.json")


@dataclass(frozen=True)
class DecisionCost:
    c0: float
    per_waiting: float
    per_running: float

    def seconds(self, waiting: int, running: int) -> float:
        return self.c0 + self.per_waiting * waiting + self.per_running * running

    def scaled(self, scale: float) -> "DecisionCost":
        return DecisionCost(self.c0 * scale, self.per_waiting * scale, self.per_running * scale)


def profile_key(config) -> str:
    """The profile a config's decisions are priced by: the policy, and for apt its cache (KV, or hybrid
    for any hidden use) and iteration shape, which change its work per request."""
    if config.scheduler != "apt":
        return config.scheduler
    cache = "kv" if config.cache_mode == "kv" else "hybrid"
    return f"apt-{cache}-{config.iteration_shape}"


def load_profile(path: str = PROFILE_PATH) -> dict:
    with open(path) as f:
        return json.load(f)


def decision_cost(config, scale: float = 1.0, profile: dict | None = None) -> DecisionCost:
    """config's decision cost from the profile (the stored one by default), times scale."""
    profile = profile if profile is not None else load_profile()
    key = profile_key(config)
    try:
        fit = profile["policies"][key]
    except KeyError:
        raise ValueError(f"no decision-time profile for {key!r} (have {sorted(profile['policies'])}); "
                         "measure one with python -m loadgen.decision_profile") from None
    return DecisionCost(fit["c0"], fit["per_waiting"], fit["per_running"]).scaled(scale)


class DecisionClock:
    """What SimExecutor charges before each step: the decision time at the scheduler's counts."""

    def __init__(self, cost: DecisionCost, scheduler):
        self.cost, self.scheduler = cost, scheduler

    def __call__(self) -> float:
        s = self.scheduler
        return self.cost.seconds(len(s.waiting), len(s.running))
