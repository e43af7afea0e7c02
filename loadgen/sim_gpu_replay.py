"""The GPU check's replay in the simulator alone, with each policy's scheduler counters.

    python -m loadgen.sim_gpu_replay --rate 16 [--policies sarathi,apt,apt-kv] [--profile P | --gpu G]
        [--num-blocks 3568] [--requests 400] [--drain-s 19] [--hidden-layer-overhead S]
    python -m loadgen.sim_gpu_replay --grid [--policies apt,apt-kv] [--profile P]

The requests of loadgen.gpu_check.replay (its ShareGPT sample, Gamma arrivals CV 1, DistServe's OPT-13B
chat SLOs, OPT-13B in bf16, the pool the device had), cut at --drain-s after the last arrival as the
check cuts them: where a real replay and its simulation part, what the simulated scheduler did (hidden
admissions, late admissions, steps, its learned per-step hidden price). --profile prices steps with a
measured profile (docs/results/gpu/h100-80gb.json); without it, --gpu's vidur fit.
--hidden-layer-overhead sets the seconds per layer that a step with absorbed hidden decodes costs beyond
its GEMMs (HardwareFit.hidden_layer_overhead), as a device may measure it.
--grid runs the policies over many setups instead (GRID: the vidur H100 and A100-40GB fits, 300
requests; with --profile, PROFILE_GRID at the check's pool) and prints each one's attainment and its
mean: what a change to how apt prices hidden rows does beyond one setup.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

from aptray.config import EngineConfig
from aptray.sim import configs_dir
from aptray.sim.calibrate import Calibration
from aptray.sim.fit import hardware_for
from aptray.sim.measured import get_gpu
from loadgen.clients import SimClient
from loadgen.gpu_check.replay import POLICIES, SAMPLE, policy_args
from loadgen.gpu_check.sizes import GPU
from loadgen.metrics import summarize
from loadgen.traces import read_trace, rescale

COUNTERS = ("admitted_kv", "admitted_hidden", "violators_admitted", "preemptions", "conversions_to_hidden",
            "conversions_to_kv")


def config(policy: str, num_blocks: int) -> EngineConfig:
    return EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), dtype="bfloat16", load_format="dummy",
                        skip_tokenizer_init=True, block_size=GPU.block_size, num_cache_blocks=num_blocks,
                        ttft_slo=GPU.ttft_slo, tbt_slo=GPU.tbt_slo, **policy_args(policy))


def hardware(profile: str | None, gpu: str, hidden_layer_overhead: float | None):
    """(HardwareFit, step overhead) of the profile or the GPU's vidur fit, its hidden layer term set if given."""
    if profile:
        cal = Calibration.load(profile)
        hw, overhead = cal.hardware, cal.step_overhead
    else:
        hw, overhead = hardware_for(get_gpu(gpu)), 1e-3
    if hidden_layer_overhead is not None:
        hw = replace(hw, hidden_layer_overhead=hidden_layer_overhead)
    return hw, overhead


def run(rate: float, policies, profile=None, gpu="h100-80gb", num_blocks=3568, requests=400, drain_s=19.0,
        hidden_layer_overhead=None) -> list[dict]:
    trace = rescale(read_trace(SAMPLE)[:requests], rate, 1.0, 0)
    hw, overhead = hardware(profile, gpu, hidden_layer_overhead)
    rows = []
    for policy in policies:
        client = SimClient(lambda: config(policy, num_blocks), gpu, overhead, GPU.ttft_slo, GPU.tbt_slo,
                           max_sim_time=trace[-1].arrived_at + drain_s, hardware=hw)
        res = client.run(trace)
        s = summarize(res.records, res.duration)
        stats = res.info["scheduler_stats"]
        rows.append({"policy": policy, "attainment": s["attainment"], "ttft_s": s["ttft_s"], "tbt_s": s["tbt_s"],
                     "steps": res.info["steps"], **{k: stats.get(k, 0) for k in COUNTERS},
                     "hidden_step_cost_s": stats.get("hidden_step_cost")})
    return rows


# (gpu, rate, blocks, hidden layer overhead): where memory binds at rates from light to overload
GRID = [(gpu, rate, blocks, overhead) for gpu in ("h100-80gb", "a100-40gb") for rate in (10, 20, 30, 40, 60)
        for blocks in (1000, 1500) for overhead in (0.0, 1e-4, 2e-4)]
PROFILE_GRID = [(rate, overhead) for rate in (8, 12, 16, 20) for overhead in (0.0, 1e-4, 2e-4, 4e-4)]


def _grid_row(job) -> tuple:
    setup, policies, profile = job
    if profile:  # the check's pool and requests: run's defaults
        rate, overhead = setup
        rows = run(rate, policies, profile, hidden_layer_overhead=overhead)
    else:
        gpu, rate, blocks, overhead = setup
        rows = run(rate, policies, None, gpu, blocks, 300, hidden_layer_overhead=overhead)
    return setup, {r["policy"]: r["attainment"] for r in rows}


def grid(policies, profile=None, workers: int = 2) -> list[tuple]:
    """(setup, policy -> attainment) over GRID, or PROFILE_GRID priced by the profile."""
    import multiprocessing as mp
    jobs = [(setup, policies, profile) for setup in (PROFILE_GRID if profile else GRID)]
    with mp.get_context("fork").Pool(workers) as pool:
        return pool.map(_grid_row, jobs)


def print_grid(rows, policies, profile=None) -> None:
    head = "rate | hidden layer overhead" if profile else "gpu | rate | blocks | hidden layer overhead"
    print(f"| {head} | " + " | ".join(policies) + " |")
    print("|" + " --- |" * (head.count("|") + 1 + len(policies)))
    for setup, att in rows:
        print("| " + " | ".join(map(str, setup)) + " | " + " | ".join(f"{att[p]:.3f}" for p in policies) + " |")
    print("| mean |" + " |" * head.count("|") + " " + " | ".join(
        f"{sum(a[p] for _, a in rows) / len(rows):.3f}" for p in policies) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float)
    ap.add_argument("--grid", action="store_true", help="the policies over GRID (or PROFILE_GRID with --profile)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--profile", help="a measured step-cost profile (gpu_check's <gpu>.json)")
    ap.add_argument("--gpu", default="h100-80gb", help="the vidur-priced GPU when no profile is given")
    ap.add_argument("--num-blocks", type=int, default=3568, help="KV blocks of 16 tokens (the H100 check's pool)")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--drain-s", type=float, default=19.0, help="simulated seconds kept after the last arrival")
    ap.add_argument("--hidden-layer-overhead", type=float, help="seconds per layer of a step with hidden decodes")
    a = ap.parse_args(argv)
    if a.grid:
        policies = a.policies.split(",")
        print_grid(grid(policies, a.profile), policies, a.profile)
        return
    if a.rate is None:
        ap.error("--rate is required without --grid")
    rows = run(a.rate, a.policies.split(","), a.profile, a.gpu, a.num_blocks, a.requests, a.drain_s,
               a.hidden_layer_overhead)
    print("| policy | attainment | TTFT p50 / p90 (ms) | TBT p50 / p90 (ms) | steps | "
          + " | ".join(COUNTERS) + " | learned hidden step cost (ms) |")
    print("|" + " --- |" * (6 + len(COUNTERS)))
    for r in rows:
        cost = r["hidden_step_cost_s"]
        print(f"| {r['policy']} | {r['attainment']:.3f} | {1e3 * r['ttft_s']['p50']:.0f} / {1e3 * r['ttft_s']['p90']:.0f} | "
              f"{1e3 * r['tbt_s']['p50']:.1f} / {1e3 * r['tbt_s']['p90']:.1f} | {r['steps']} | "
              + " | ".join(str(r[k]) for k in COUNTERS) + f" | {'-' if cost is None else f'{1e3 * cost:.1f}'} |")


if __name__ == "__main__":
    main()
