"""The simulator charges each step the decision time of the policy that made it (aptray.sim.decision_time):
a heavier profile slows that policy's simulated steps; the step time the scheduler learns from leaves it
out, as the real engine's does; `--decision-time none` charges the constant step overhead alone."""
import os

import numpy as np
import pytest

from aptray.config import EngineConfig
from aptray.sampling_params import SamplingParams
from aptray.sim import configs_dir
from aptray.sim.decision_time import DecisionClock, DecisionCost, decision_cost, load_profile, profile_key
from aptray.sim.outcomes import SimRequest
from aptray.sim.runner import build_engine, simulate


def config(policy="fcfs", **kw):
    return EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), scheduler=policy, **kw)


def trace(n=30, rate=8.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    return [SimRequest(f"r{i}", float(t[i]), int(rng.integers(16, 600)), int(rng.integers(2, 100)), 0.5, 0.2)
            for i in range(n)]


def test_every_policy_the_results_use_has_a_measured_profile():
    profile = load_profile()
    keys = {profile_key(config(p, **kw)) for p, kw in [
        ("fcfs", {}), ("sarathi", {}), ("vllm", {}), ("apt", {"cache_mode": "kv"}),
        ("apt", {"cache_mode": "hybrid"}), ("apt", {"cache_mode": "hybrid", "iteration_shape": "alternate"}),
        ("apt", {"cache_mode": "kv", "iteration_shape": "alternate"})]}
    assert keys <= set(profile["policies"])
    assert profile_key(config("apt", cache_mode="hidden")) == "apt-hybrid-mixed"
    for fit in profile["policies"].values():
        assert min(fit["c0"], fit["per_waiting"], fit["per_running"]) >= 0
    # apt's decisions cost more than fcfs's with the same queue and running set
    assert decision_cost(config("apt", cache_mode="hybrid")).seconds(1000, 256) > \
        decision_cost(config("fcfs")).seconds(1000, 256)


def test_the_charge_follows_the_schedulers_counts():
    class Counts:
        waiting, running = [0] * 7, [0] * 3
    clock = DecisionClock(DecisionCost(1e-4, 2e-6, 1e-5), Counts())
    assert clock() == pytest.approx(1e-4 + 7 * 2e-6 + 3 * 1e-5)
    assert DecisionCost(1e-4, 2e-6, 1e-5).scaled(2).seconds(7, 3) == pytest.approx(2 * clock())


def test_a_heavier_decision_profile_slows_the_policys_simulated_steps():
    reqs = trace()
    # scales where the charge is a visible share of a step (the measured profile alone is ~0.1 ms a
    # decision, within the noise of how a run's batches happen to fall)
    runs = {scale: simulate(config("vllm"), reqs, decision_scale=scale) for scale in (None, 30.0, 300.0)}
    assert runs[None].decision_time == 0
    assert 0 < runs[30.0].decision_time < runs[300.0].decision_time
    alone = trace(n=1)  # a lone request's first token waits for its first decision, nothing else
    lone = {scale: simulate(config("vllm"), alone, decision_scale=scale) for scale in runs}
    ttft = lambda run: run.outcomes[0].token_times[0] - run.outcomes[0].arrival_time  # noqa: E731
    for heavier, lighter in ((30.0, None), (300.0, 30.0)):
        assert runs[heavier].sim_time > runs[lighter].sim_time
        assert ttft(lone[heavier]) > ttft(lone[lighter])


def test_the_step_time_the_scheduler_sees_leaves_the_decision_out():
    engine, executor = build_engine(config("fcfs"), "a100-40gb", decision_scale=100.0)
    for r in trace(4):
        engine.add_request(r.request_id, [5] * r.prompt_len, SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                           arrival_time=0.0)
    before = executor.clock.now
    step = engine.step()
    assert step.result.step_time == pytest.approx(executor.busy_time)
    assert executor.clock.now - before == pytest.approx(executor.busy_time + executor.decision_time)
    assert executor.decision_time > 0
