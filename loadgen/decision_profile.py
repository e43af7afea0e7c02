"""Measure each policy's decision time over queue and running-set sizes; fit what the simulator charges.

    python -m loadgen.decision_profile [--out aptray/sim/data/decision_time.json]

Drives every policy with the scheduler benchmark (loadgen.bench_scheduler.bench: the real
scheduler, an instant executor, GC frozen after start-up as the server runs it) over a grid of
queued requests and max_num_seqs, records each decision's thread CPU time with the waiting and
running counts it left, and fits per policy, by least squares over every decision,
    seconds = c0 + per_waiting * waiting + per_running * running
(a coefficient that comes out negative is dropped and the rest refitted). The JSON also keeps the
host (CPU, Python, load average), the time of a fixed pure-Python reference workload on it, and
per grid case the measured and fitted mean, so a reader sees how well a line holds.
aptray.sim.decision_time reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np

from aptray.sim.decision_time import PROFILE_PATH

# profile key -> (policy, iteration shape, cache mode), as aptray.sim.decision_time.profile_key names them
VARIANTS = {
    "fcfs": ("fcfs", "mixed", "kv"),
    "sarathi": ("sarathi", "mixed", "kv"),
    "vllm": ("vllm", "mixed", "kv"),
    "apt-kv-mixed": ("apt", "mixed", "kv"),
    "apt-kv-alternate": ("apt", "alternate", "kv"),
    "apt-hybrid-mixed": ("apt", "mixed", "hybrid"),
    "apt-hybrid-alternate": ("apt", "alternate", "hybrid"),
}
GRID = [(n, seqs) for n in (64, 256, 1000, 4000) for seqs in (16, 64, 256) if seqs <= n]
ITERS = 60


def reference_seconds(repeats: int = 5) -> float:
    """Thread CPU seconds of a fixed pure-Python workload (the best of repeats): attribute reads,
    small objects, a sort, as a scheduler does. The ratio of two hosts' values is a --decision-scale."""
    best = float("inf")
    for _ in range(repeats):
        rng = random.Random(0)
        t0 = time.thread_time()
        items = [(rng.random(), i, (i, i + 1)) for i in range(50_000)]
        items.sort()
        total = sum(t[2][1] for t in items if t[0] > 0.5)
        best = min(best, time.thread_time() - t0)
    assert total > 0
    return best


def fit_line(samples: np.ndarray) -> dict[str, float]:
    """Least squares of seconds on (1, waiting, running), dropping negative coefficients."""
    x = np.column_stack([np.ones(len(samples)), samples[:, 0], samples[:, 1]])
    y = samples[:, 2]
    keep = [0, 1, 2]
    while True:
        coef = np.linalg.lstsq(x[:, keep], y, rcond=None)[0]
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(3)
    full[keep] = np.maximum(coef, 0)
    return {"c0": float(full[0]), "per_waiting": float(full[1]), "per_running": float(full[2])}


def measure(variants: dict, grid, iters: int, log=print) -> dict:
    from loadgen.bench_scheduler import bench, tiny_opt_config_dir
    model_dir = tiny_opt_config_dir()
    out = {}
    for key, (policy, shape, mode) in variants.items():
        samples, cases = [], []
        for n, seqs in grid:
            mine: list = []
            bench(model_dir, policy, shape, mode, n, seqs, iters, samples=mine)
            samples += mine
            cases.append({"requests": n, "max_num_seqs": seqs, "mean_waiting": float(np.mean([s[0] for s in mine])),
                          "mean_running": float(np.mean([s[1] for s in mine])),
                          "mean_ms": 1e3 * float(np.mean([s[2] for s in mine]))})
        fit = fit_line(np.array(samples, dtype=float))
        for c in cases:
            c["fitted_ms"] = 1e3 * (fit["c0"] + fit["per_waiting"] * c["mean_waiting"]
                                    + fit["per_running"] * c["mean_running"])
        out[key] = {**fit, "decisions": len(samples), "cases": cases}
        log(f"{key:22s} c0 {1e6 * fit['c0']:7.1f} us  per waiting {1e9 * fit['per_waiting']:7.1f} ns  "
            f"per running {1e9 * fit['per_running']:7.1f} ns  ({len(samples)} decisions)")
    return out


def host() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "python": sys.version.split()[0], "load_average": os.getloadavg()[0],
            "reference_seconds": reference_seconds()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=PROFILE_PATH)
    ap.add_argument("--iters", type=int, default=ITERS, help="decisions per grid case")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which profile keys to measure")
    args = ap.parse_args(argv)
    chosen = {k: VARIANTS[k] for k in args.variants.split(",")}
    t0 = time.time()
    before = host()
    policies = measure(chosen, GRID, args.iters)
    after = host()
    profile = {"command": "python -m loadgen.decision_profile", "date": time.strftime("%Y-%m-%d %H:%M"),
               "host": {**before, "load_average_after": after["load_average"],
                        "reference_seconds": min(before["reference_seconds"], after["reference_seconds"])},
               "model": "line over (waiting, running) after the decision; thread CPU time; GC frozen after start-up",
               "grid": GRID, "iters": args.iters, "wall_s": time.time() - t0, "policies": policies}
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
