"""Stage 5: a real-clock replay on the device's engine, then the simulator on the same requests.

ShareGPT lengths (loadgen/data/sharegpt-opt2048.csv), Gamma arrivals (CV 1) at two rates near the
knee, fcfs, sarathi, apt (hybrid cache, absorbed) and apt-kv on the engine in this process
(InProcessEngineClient: wall clock, requests join between steps at their arrival times), with
DistServe's OPT-13B chat SLOs. Then the simulator, priced by stage 4's profile, replays the same
requests, cut at the same time: sim / real for TTFT and TBT p50 and p90.

The two rates are fcfs's and apt's knees (the highest rate that keeps 90% attainment) as the
simulator finds them with the profile, unless --rates gives them. Each run's requests are as many
as its rate brings in the arrival window the budget leaves; what is still running when the run's
drain allowance ends is aborted (a miss), in both replays alike.

Every real step is also written to DIR/replay_steps.json, one table per run: when it started, its
whole time and the scheduler's share of it, the queue it left, what it computed (the scheduler's own
step features, aptray.scheduler.step_cost) and what the scheduler's online cost model predicted for it
before it ran. It is what tells why a policy's real run left its simulated one.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace

import numpy as np

from aptray.engine import Engine
from aptray.scheduler.step_cost import FEATURES, step_features
from aptray.sim.calibrate import timed_step
from loadgen.gpu_check.step_costs import engine_config, runner
from loadgen.metrics import summarize
from loadgen.run_setup import POLICY_DEFAULTS
from loadgen.sweep import effective_throughput
from loadgen.traces import read_trace, rescale

SAMPLE_NAME = "loadgen/data/sharegpt-opt2048.csv"
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), SAMPLE_NAME)
# a policy with engine arguments over its defaults: apt on the KV cache alone tells what the hybrid
# cache does to apt on the device
VARIANTS = {"apt-kv": ("apt", {"cache_mode": "kv"})}
POLICIES = ("fcfs", "sarathi", "apt", "apt-kv")  # what the replay runs unless --policies says otherwise
STEP_COLUMNS = ("t_s", "seconds", "schedule_s", "waiting", "running", "predicted_s") + FEATURES
KNEE_POLICIES = ("fcfs", "apt")
THRESHOLD = 0.9  # attainment that defines the knee (effective throughput, docs/ARCHITECTURE.md section 4)
SIM_TOLERANCE = 0.15  # the target for sim / real on TTFT and TBT p50, p90


def policy_args(policy: str) -> dict:
    """EngineConfig arguments of a replay policy: its scheduler, its defaults, a variant's own."""
    base, extra = VARIANTS.get(policy, (policy, {}))
    return {"scheduler": base, **POLICY_DEFAULTS[base], **extra}


def sample_trace(s) -> list:
    """The committed ShareGPT lengths, scaled by length_scale (the smoke run's tiny model)."""
    trace = read_trace(SAMPLE)
    if s.length_scale != 1.0:
        trace = [replace(r, num_prefill_tokens=max(4, round(r.num_prefill_tokens * s.length_scale)),
                         num_decode_tokens=max(2, round(r.num_decode_tokens * s.length_scale))) for r in trace]
    return trace


def _compact(summary: dict) -> dict:
    keep = ("num_requests", "statuses", "attainment", "goodput_rps", "duration_s", "preemptions", "ttft_s", "tbt_s")
    return {k: summary[k] for k in keep}


def _ratios(real: dict, sim: dict) -> dict:
    return {f"{k}_{p}": sim[k][p] / real[k][p] if real[k][p] else None for k in ("ttft_s", "tbt_s") for p in ("p50", "p90")}


class TimedEngine(Engine):
    """An Engine over a RecordingExecutor whose steps stamp their whole wall time (scheduler, runner,
    post-processing) on the recorded sample: what the profile prices. Each step that ran also adds a
    row of STEP_COLUMNS to self.step_rows (predicted_s None: no cost model, or not calibrated yet)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_rows: list[list[float]] = []
        self._t0 = time.perf_counter()

    def step(self, want_logits: bool = False):
        cost = getattr(self.scheduler, "cost", None)
        coef = None if cost is None or not cost.ready else cost.coef.copy()  # before this step's observation
        start = time.perf_counter()
        out = timed_step(super(), self.executor, time.perf_counter)  # super(): Engine.step of this engine
        if out.plan is not None and out.plan.seqs:
            x = step_features(out.plan)
            sched = self.scheduler
            self.step_rows.append([start - self._t0, time.perf_counter() - start, out.schedule_s, len(sched.waiting),
                                   len(sched.running), float(coef @ x) if coef is not None else None, *x.tolist()])
        return out

    def cost_coefficients(self) -> dict | None:
        cost = getattr(self.scheduler, "cost", None)
        return cost.coefficients() if cost is not None else None


class Replayer:
    def __init__(self, ctx, profile: str, gpu: str):
        self.ctx, self.s, self.profile, self.gpu = ctx, ctx.sizes, profile, gpu
        self.runner = runner(ctx)

    def config(self, policy: str):
        return engine_config(self.ctx, num_cache_blocks=self.runner.num_blocks, ttft_slo=self.s.ttft_slo,
                             tbt_slo=self.s.tbt_slo, **policy_args(policy))

    def sim(self, policy: str, trace, max_sim_time=None, full: bool = True) -> dict:
        from loadgen.clients import SimClient
        client = SimClient(lambda: self.config(policy), self.gpu, ttft_slo=self.s.ttft_slo, tbt_slo=self.s.tbt_slo,
                           max_sim_time=max_sim_time, stop_when_decided=not full, calibration=self.profile)
        res = client.run(trace)
        return summarize(res.records, res.duration)

    def real(self, policy: str, trace, drain_s: float):
        """The engine on the wall clock; returns (summary, scheduler stats, the profile's error on its steps,
        its steps: {"columns", "rows", "cost_coefficients"})."""
        from aptray.executor.local import LocalExecutor
        from aptray.sim.calibrate import Calibration, RecordingExecutor, predict
        from loadgen.clients import InProcessEngineClient

        config = self.config(policy)
        rec = RecordingExecutor(LocalExecutor(config, self.runner))
        engines = []
        client = InProcessEngineClient(lambda: engines.append(TimedEngine(config, rec)) or engines[-1], None,
                                       self.s.ttft_slo, self.s.tbt_slo, seed=0, timeout=drain_s)
        res = client.run(trace)
        steps_table = {"columns": STEP_COLUMNS, "rows": engines[-1].step_rows,
                       "cost_coefficients": engines[-1].cost_coefficients()}
        cal = Calibration.load(self.profile)
        steps = rec.samples[1:]
        err = None
        if steps:
            pred = predict(steps, config, cal.hardware, cal.step_overhead)
            measured = np.array([smp.seconds for smp in steps])
            rel = np.abs(pred / measured - 1)
            err = {"steps": len(steps), "mean": float(rel.mean()), "p90": float(np.percentile(rel, 90)),
                   "predicted_over_measured_total": float(pred.sum() / measured.sum())}
        return summarize(res.records, res.duration), res.info.get("scheduler_stats"), err, steps_table

    def knees(self, trace) -> dict:
        lo, hi = self.s.knee_search
        out = {}
        for policy in KNEE_POLICIES:
            found = effective_throughput(
                lambda rate: self.sim(policy, rescale(trace, rate, 1.0, 0), full=False)["attainment"],
                lo, hi, THRESHOLD, rel_tol=0.1, max_probes=10)
            out[policy] = found.rate
        return out

    def warm_up(self) -> None:
        """A few requests through a KV and a hybrid engine: kernels compiled before any timed run."""
        warm = [replace(r, num_prefill_tokens=min(r.num_prefill_tokens, 64), num_decode_tokens=4)
                for r in sample_trace(self.s)[:4]]
        for policy in ("fcfs", "apt"):
            self.real(policy, rescale(warm, 1000.0, 1.0, 0), drain_s=30.0)


def replay_policies(args) -> tuple:
    """--policies, checked against what the replay runs; POLICIES by default."""
    if not getattr(args, "policies", None):
        return POLICIES
    wanted = tuple(args.policies.split(","))
    unknown = set(wanted) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown replay policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    return wanted


def choose_rates(knees: dict, lo: float, hi: float = math.inf) -> list[float]:
    """fcfs's and apt's knees; the one knee and 1.25x it when they are within 10% or one is missing.
    A knee outside the search range [lo, hi] is taken at its edge: the bisection did not bracket it,
    and a replay at a rate far outside it would take either no time or all of the stage's."""
    found = sorted(min(max(k, lo), hi) for k in knees.values() if k > 0)
    if not found:
        return [lo, 2 * lo]
    a, b = found[0], found[-1]
    return [round(a, 3), round(b if b >= 1.1 * a else 1.25 * a, 3)]


def run(ctx, pace, result: dict) -> None:
    s = ctx.sizes
    policies = replay_policies(ctx.args)
    profile, gpu = ctx.state.get("profile"), ctx.state.get("gpu_key")
    if profile is None:
        raise RuntimeError("no step-cost profile: run the step_costs stage too, or give --profile")
    rp = Replayer(ctx, profile, gpu)
    result.update(slo={"ttft_s": s.ttft_slo, "tbt_s": s.tbt_slo}, profile=profile, sample=SAMPLE_NAME,
                  length_scale=s.length_scale, num_blocks=rp.runner.num_blocks)
    trace = sample_trace(s)[:s.replay_max_requests]
    rp.warm_up()
    if ctx.args.rates:
        rates, result["rate_source"] = sorted(float(r) for r in ctx.args.rates.split(",")), "--rates"
    else:
        result["sim_knees"] = rp.knees(trace[:s.knee_requests])
        rates, result["rate_source"] = choose_rates(result["sim_knees"], *s.knee_search), "simulated knees"
    result["rates"] = rates
    ctx.log(f"replay rates {rates} ({result['rate_source']})")
    runs = result.setdefault("runs", [])
    try:
        _replay_runs(ctx, pace, rp, trace, rates, policies, runs)
    finally:  # what ran is judged even when the deadline cut the stage
        _targets(result, runs, rates)


def _replay_runs(ctx, pace, rp: Replayer, trace, rates: list, policies: tuple, runs: list) -> None:
    s = ctx.sizes
    jobs = [(rate, policy) for rate in rates for policy in policies]
    steps_path = os.path.join(ctx.out_dir, "replay_steps.json")
    step_tables = {}
    for i, (rate, policy) in enumerate(jobs):
        allowance = pace.left() / (len(jobs) - i)
        window = max(allowance - s.replay_drain_s, 0.5 * allowance)
        n = int(np.clip(round(rate * window), s.replay_min_requests, s.replay_max_requests))
        if n / rate + 1.0 > pace.left():
            pace.skipped += len(jobs) - i
            break
        run_trace = rescale(trace[:n], rate, 1.0, 0)
        drain = max(1.0, allowance - run_trace[-1].arrived_at)
        real, stats, err, steps = rp.real(policy, run_trace, drain)
        step_tables[f"{policy}@{rate:g}"] = steps
        with open(steps_path, "w") as f:
            json.dump(step_tables, f)
        sim = rp.sim(policy, run_trace, max_sim_time=run_trace[-1].arrived_at + drain)
        runs.append({"rate": rate, "policy": policy, "requests": n, "drain_s": drain, "real": _compact(real),
                     "sim": _compact(sim), "sim_over_real": _ratios(real, sim), "scheduler_stats": stats,
                     "profile_error_on_real_steps": err})
        ctx.log(f"replay {policy} @ {rate:g} req/s, {n} requests: attainment real {real['attainment']:.3f} "
                f"sim {sim['attainment']:.3f}; sim/real {runs[-1]['sim_over_real']}")
        ctx.checkpoint()


def _targets(result: dict, runs: list, rates: list) -> None:
    att = {(r["rate"], r["policy"]): r["real"]["attainment"] for r in runs}
    apt_vs_fcfs = {str(rate): (att[(rate, "apt")], att[(rate, "fcfs")]) for rate in rates
                   if (rate, "apt") in att and (rate, "fcfs") in att}
    ratios = [v for r in runs for v in r["sim_over_real"].values() if v is not None and math.isfinite(v)]
    worst = max((abs(v - 1) for v in ratios), default=None)
    result["summary"] = {"runs": len(runs), "apt_vs_fcfs_attainment": apt_vs_fcfs, "sim_over_real_worst": worst}
    result["targets"] = {
        "apt_ge_fcfs": {"met": all(a >= f for a, f in apt_vs_fcfs.values()) if len(apt_vs_fcfs) == len(rates)
                        else None, "value": "; ".join(f"{float(r):g} req/s: apt {a:.3f}, fcfs {f:.3f}"
                                                      for r, (a, f) in apt_vs_fcfs.items()) or None,
                        "target": "apt's SLO attainment >= fcfs's at both rates"},
        "sim_within_15pct": {"met": worst <= SIM_TOLERANCE if worst is not None else None,
                             "value": None if worst is None else f"sim/real off 1 by up to {worst:.2f}",
                             "target": "simulator within 15% of real on TTFT and TBT p50, p90"}}
