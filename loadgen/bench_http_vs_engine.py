"""Effective throughput through the HTTP API vs the in-process engine, same workload, same run.

  python -m loadgen.bench_http_vs_engine [--rates 16 32 64 128] [--seconds 15] [--app-args '{"k": v}']

Starts the app on loopback (Ray Serve, embedded tiny model, TP=1) and, rate by rate, replays the
soak's workload (its prompts, 16-64 greedy output tokens, Poisson arrivals, the same SLOs) once
through streaming HTTP and once through an Engine in this process. Fair by construction:

- the same requests: the same arrival times and output lengths from the same seed; the engine
  gets exactly the token ids the server's tokenizer makes of the prompt texts HTTP sends;
- the same engine: both are built from one AppArgs (EngineConfig, executor in the router's
  process at TP=1, one BLAS thread), so scheduler, cache and batch limits are identical;
- the same SLOs, measured the same way: from the scheduled arrival to each token (for HTTP the
  time its SSE event's bytes were read, for the engine the end of the step that made it);
- a lean client (loadgen.clients.HttpStreamClient) so the load generator's own CPU, which shares
  the machine, costs the server as little as possible; its CPU time is reported;
- each side's top rate is searched for, not capped by the grid: after the grid, rates go up by
  --growth until attainment drops below --target, then bisect to --resolution.

Effective throughput: the highest rate with attainment >= --target below the lowest rate without.
Writes the curves, both effective rates and their ratio (HTTP / engine) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from loadgen.arrivals import arrival_times
from loadgen.clients import HttpStreamClient, InProcessEngineClient
from loadgen.metrics import attainment
from loadgen.soak import PROMPTS
from loadgen.traces import TraceRequest

# what the app and the in-process engine both get (AppArgs fields)
APP_ARGS = {"tensor_parallel_size": 1, "num_cache_blocks": 256, "max_num_seqs": 32, "max_queue": 512,
            "use_gpu": False}


def soak_workload(rate: float, seconds: float, seed: int, tokenizer) -> list[TraceRequest]:
    """The soak's requests at this rate (loadgen.soak.run_load's arrivals, lengths and prompts)."""
    n = max(1, int(rate * seconds))
    arrivals = arrival_times(rate, 1.0, n, seed)
    lengths = np.random.default_rng(seed).integers(16, 65, size=n)
    return [TraceRequest(str(i), float(arrivals[i]), len(tokenizer.encode(PROMPTS[i % len(PROMPTS)])),
                         int(lengths[i]), prompt=PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def effective(curve: dict[float, float], threshold: float = 0.9) -> float:
    """The highest passing rate below the lowest failing one (0 if none passes)."""
    fails = [r for r, a in curve.items() if a < threshold]
    limit = min(fails) if fails else float("inf")
    ok = [r for r, a in curve.items() if a >= threshold and r < limit]
    return max(ok) if ok else 0.0


def next_probe(curve: dict[float, float], threshold: float, growth: float, resolution: float,
               max_rate: float) -> float | None:
    """The next rate to try: above the top when everything passed, else the middle of the gap
    between the effective rate and the first failing one; None once the gap is within resolution."""
    good = effective(curve, threshold)
    fails = [r for r, a in curve.items() if a < threshold]
    if not fails:
        top = max(curve)
        return min(top * growth, max_rate) if top < max_rate else None
    bad = min(fails)
    if good <= 0:  # nothing passes: halve below the lowest rate tried
        low = min(curve) / 2
        return low if low >= 1 else None
    if (bad - good) / good <= resolution:
        return None
    return round((good + bad) / 2, 2)


def start_app(app_args: dict, num_cpus: int):
    """Ray + Serve + aptray on loopback; returns (url, stop)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from aptray.app import build_app
    from aptray.worker.shard import free_port

    ray.init(include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="aptray", route_prefix="/")

    def stop():
        serve.shutdown()
        ray.shutdown()
    return f"http://127.0.0.1:{port}", stop


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--seconds", type=float, default=15.0, help="arrivals per run span this long")
    p.add_argument("--ttft-slo", type=float, default=1.0)
    p.add_argument("--tbt-slo", type=float, default=0.25)
    p.add_argument("--target", type=float, default=0.9, help="attainment that counts as meeting the SLOs")
    p.add_argument("--growth", type=float, default=1.5, help="rate factor while everything passes")
    p.add_argument("--resolution", type=float, default=0.1, help="stop bisecting when (fail - pass) / pass is this")
    p.add_argument("--max-rate", type=float, default=2048.0)
    p.add_argument("--max-probes", type=int, default=8, help="searched rates per side after the grid")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=3, help="Ray's CPUs for the app")
    p.add_argument("--app-args", default="{}", help="JSON of extra build_app args (both sides get them)")
    p.add_argument("--out", default="results/http_vs_engine.json")
    args = p.parse_args(argv)

    import psutil
    import torch
    from transformers import AutoTokenizer

    from aptray.serve.args import AppArgs
    from aptray.serve.engine_loop import build_engine

    app_args = {**APP_ARGS, "ttft_slo_ms": args.ttft_slo * 1000, "tbt_slo_ms": args.tbt_slo * 1000,
                **json.loads(args.app_args)}
    parsed = AppArgs.parse(app_args)
    config = parsed.engine_config()
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    n_threads = torch.get_num_threads()

    def engine_factory():  # the router's own engine: same config, same executor choice
        return build_engine(config, parsed, tokenizer, "bench")

    local = InProcessEngineClient(engine_factory, tokenizer, args.ttft_slo, args.tbt_slo, args.seed,
                                  add_special_tokens=True)
    url, stop = start_app(app_args, args.num_cpus)
    http_client = HttpStreamClient(url, args.ttft_slo, args.tbt_slo)
    curves: dict[str, dict[float, float]] = {"http": {}, "engine": {}}
    client_cpu: dict[float, float] = {}
    me = psutil.Process()

    def probe(side: str, rate: float) -> None:
        trace = soak_workload(rate, args.seconds, args.seed, tokenizer)
        if side == "http":
            cpu = me.cpu_times()
            records = http_client.run(trace).records
            after = me.cpu_times()
            client_cpu[rate] = (after.user + after.system - cpu.user - cpu.system) / max(1, len(trace))
        else:
            records = local.run(trace).records
        curves[side][rate] = attainment(records)
        print(f"rate {rate:7.2f} req/s  {side:6s} attainment {curves[side][rate]:.3f}", flush=True)

    t0 = time.time()
    try:
        for rate in args.rates:  # interleaved, so load from elsewhere hits both alike
            probe("http", rate)
            probe("engine", rate)
        pending = {"http": args.max_probes, "engine": args.max_probes}
        while any(pending.values()):
            for side in ("http", "engine"):
                rate = next_probe(curves[side], args.target, args.growth, args.resolution, args.max_rate) \
                    if pending[side] else None
                if rate is None or rate in curves[side]:
                    pending[side] = 0
                    continue
                pending[side] -= 1
                probe(side, rate)
    finally:
        stop()
        torch.set_num_threads(n_threads)
    result = {"app_args": app_args, "seconds_per_run": args.seconds, "target_attainment": args.target,
              "slo_s": {"ttft": args.ttft_slo, "tbt": args.tbt_slo},
              "attainment_http": dict(sorted(curves["http"].items())),
              "attainment_engine": dict(sorted(curves["engine"].items())),
              "effective_http_rps": effective(curves["http"], args.target),
              "effective_engine_rps": effective(curves["engine"], args.target),
              "client_cpu_ms_per_request": {r: round(c * 1000, 3) for r, c in sorted(client_cpu.items())},
              "wall_s": round(time.time() - t0, 1)}
    result["ratio_http_over_engine"] = (result["effective_http_rps"] / result["effective_engine_rps"]
                                        if result["effective_engine_rps"] else None)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("effective_http_rps", "effective_engine_rps",
                                             "ratio_http_over_engine")}))


if __name__ == "__main__":
    main()
