"""Validate the simulator on this machine: calibrate the cost model to the real CPU engine (small
random OPT), then replay one trace on both and compare TTFT/TBT percentiles."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from loadgen.clients import InProcessEngineClient, SimClient
from loadgen.metrics import summarize
from loadgen.traces import TraceRequest, make_trace
from loadgen.datasets import Sample


def small_opt(path: str) -> str:
    from aptray.model.factory import make_tiny_model
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny_model(path, "opt", hidden_size=256, num_layers=4, num_heads=8, max_positions=1024, vocab_size=512)
    return path


def validation_trace(n: int, rate: float, seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    samples = [Sample("", int(rng.integers(8, 300)), int(rng.integers(4, 64))) for _ in range(n)]
    return make_trace(samples, rate, 1.0, seed)


def calibrate_and_validate(out_dir: str, num_requests: int = 40, rate: float = 4.0, seed: int = 0,
                           ttft_slo: float = 0.5, tbt_slo: float = 0.1, threads: int = 1) -> dict:
    import torch

    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.sim.calibrate import collect_steps, fastest_per_shape, fit_cpu

    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    model = small_opt(os.path.join(out_dir, "opt-small"))
    config = lambda: EngineConfig(model=model, num_cache_blocks=512, block_size=16)  # noqa: E731
    samples = collect_steps(config())
    cal = fit_cpu(fastest_per_shape(samples), config())
    cal_path = os.path.join(out_dir, "cpu_calibration.json")
    cal.save(cal_path)

    trace = validation_trace(num_requests, rate, seed)

    def engine():
        c = config()
        return Engine(c, LocalExecutor(c))
    real = InProcessEngineClient(engine, ttft_slo=ttft_slo, tbt_slo=tbt_slo).run(trace)
    sim = SimClient(config, ttft_slo=ttft_slo, tbt_slo=tbt_slo, calibration=cal_path, stop_when_decided=False).run(trace)
    out = {"calibration": cal_path, "fit_error": vars(cal.error), "step_samples": len(samples),
           "real": summarize(real.records, real.duration), "sim": summarize(sim.records, sim.duration)}
    with open(os.path.join(out_dir, "validation.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(args) -> None:
    out = calibrate_and_validate(args.out_dir or tempfile.mkdtemp(prefix="aptray-cal-"), args.num_requests,
                                 args.rate, args.seed, args.ttft_slo, args.tbt_slo, args.threads)
    print(f"fit: mean |err| {out['fit_error']['mean']:.1%}, median {out['fit_error']['median']:.1%} "
          f"over {out['fit_error']['n']} step shapes")
    for key in ("ttft_s", "tbt_s"):
        for src in ("real", "sim"):
            p = out[src][key]
            print(f"{key:6s} {src:4s} p50 {p['p50'] * 1e3:8.2f} ms  p90 {p['p90'] * 1e3:8.2f} ms  p99 {p['p99'] * 1e3:8.2f} ms")
    print(f"attainment real {out['real']['attainment']:.3f} sim {out['sim']['attainment']:.3f}")
