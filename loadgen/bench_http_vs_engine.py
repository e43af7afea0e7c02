"""Effective throughput through the HTTP API vs the in-process engine, same workload, same run.

  python -m loadgen.bench_http_vs_engine [--rates 4 8 12 16 20 24] [--seconds 20]

Starts the app on loopback (Ray Serve, embedded tiny model, TP=1) and, at each rate in turn,
replays the soak's workload (its prompts, 16-64 output tokens, Poisson arrivals) once through
streaming HTTP and once through an Engine in this process built with the app's engine settings.
Effective throughput: the highest rate with attainment >= 0.9; the ratio HTTP / engine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os

import numpy as np

from loadgen.arrivals import arrival_times
from loadgen.clients import InProcessEngineClient
from loadgen.metrics import attainment
from loadgen.soak import PROMPTS, run_load, start_local_app
from loadgen.traces import TraceRequest

APP_ENGINE_ARGS = {"num_cache_blocks": 256, "max_num_seqs": 32}  # what start_local_app deploys


def soak_workload(rate: float, seconds: float, seed: int, tokenizer) -> list[TraceRequest]:
    """The requests run_load sends at this rate, as a trace for the in-process client."""
    n = max(1, int(rate * seconds))
    arrivals = arrival_times(rate, 1.0, n, seed)
    lengths = np.random.default_rng(seed).integers(16, 65, size=n)
    return [TraceRequest(str(i), float(arrivals[i]), len(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]),
                         int(lengths[i]), prompt=PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def effective(curve: dict[float, float], threshold: float = 0.9) -> float:
    ok = [r for r, a in sorted(curve.items()) if a >= threshold]
    return max(ok) if ok else 0.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[4, 8, 12, 16, 20, 24])
    p.add_argument("--seconds", type=float, default=20.0, help="arrivals per run span this long")
    p.add_argument("--ttft-slo", type=float, default=1.0)
    p.add_argument("--tbt-slo", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="results/http_vs_engine.json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.worker.shard import default_model_path, ensure_tiny_model

    torch.set_num_threads(1)
    model = ensure_tiny_model(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)

    def engine_factory():
        config = EngineConfig(model=model, ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo, **APP_ENGINE_ARGS)
        return Engine(config, LocalExecutor(config), tokenizer)

    local = InProcessEngineClient(engine_factory, tokenizer, args.ttft_slo, args.tbt_slo, args.seed)
    url, stop = start_local_app(1, 3, None)
    http, engine = {}, {}
    try:
        for rate in args.rates:  # interleaved, so load from elsewhere hits both alike
            http[rate] = attainment(asyncio.run(run_load(url, {}, rate, args.seconds, args.seed,
                                                         args.ttft_slo, args.tbt_slo)))
            engine[rate] = attainment(local.run(soak_workload(rate, args.seconds, args.seed, tokenizer)).records)
            print(f"rate {rate:5.1f} req/s  attainment http {http[rate]:.3f}  engine {engine[rate]:.3f}", flush=True)
    finally:
        stop()
    result = {"rates": args.rates, "attainment_http": http, "attainment_engine": engine,
              "effective_http_rps": effective(http), "effective_engine_rps": effective(engine),
              "slo_s": {"ttft": args.ttft_slo, "tbt": args.tbt_slo}, "seconds_per_run": args.seconds}
    result["ratio_http_over_engine"] = (result["effective_http_rps"] / result["effective_engine_rps"]
                                        if result["effective_engine_rps"] else None)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("effective_http_rps", "effective_engine_rps",
                                             "ratio_http_over_engine")}))


if __name__ == "__main__":
    main()
