"""The real server on a wall clock for docs/RESULTS.md: apt vs vllm vs fcfs through HTTP, several seeds.

What a user of a serving system measures, on this machine:
- one `serve run`-equivalent app per policy (aptray.app.build_app under the route prefix /<policy>),
  side by side in one Ray Serve instance on loopback, each with the engine of loadgen.results_cpu:
  tiny random OPT (d 128, 4 layers, 2 heads of 64), 48 blocks of 16 tokens (memory binds),
  max_num_seqs 64, a 512-token step budget, the model in the router's process on one BLAS thread,
  tokens streamed every step (stream_interval_ms 0: no batching of the client's gaps);
- the client is loadgen's lean HTTP client (streamed /v1/completions); a request's TTFT and gaps are
  taken at the client on the wall clock, from its scheduled arrival, through the whole server;
- per seed: a ShareGPT sample of that seed (vLLM's length rule within the 512-token context) and
  Gamma arrivals (CV 1) of that seed at each rate; every policy replays the same requests, the
  policies interleaved in an order that rotates per run, so load from elsewhere on the shared
  machine falls on all of them alike;
- SLOs in units measured through the server at the client before the runs (one app, nothing else
  in flight): TTFT = 2 x one full-context (511-token) prompt's served TTFT, TBT = 10 x the median
  gap of 16 requests decoding together (SLO_SCALE says why twice the CPU table's ratios). The engine's own
  units (prefill, decode step) would leave out the serving path, which at this tiny model's speed
  is not small: a lone 40-token prompt's TTFT is ~26 ms through HTTP against a ~5 ms prefill (and
  the engine-unit SLOs of the CPU table, 42 ms / 12 ms, were met by under 5% of requests even at
  the lowest rate). The rate grid is results_cpu's kind (chosen at a reference decode step, scaled by
  this engine's decode step, measured in this process: throughput is the engine's);
- effective throughput per seed (loadgen.sweep.crossing_rate over its rates), reported as the mean
  and the standard deviation over seeds, with the range; apt's ratios per seed (paired: the same
  requests), mean and standard deviation.
"""
from __future__ import annotations

import os
import time

import numpy as np

from loadgen.results_cpu import BLOCK_SIZE, CONTEXT, MAX_NUM_SEQS, NUM_BLOCKS, REFERENCE_DECODE_STEP_S

DATASET = "sharegpt"
# (TTFT in served full-context TTFTs, TBT in served 16-request gaps): twice DistServe's chat ratios
# (1, 5) of the CPU table. On the shared 2-core machine other processes' CPU time lands inside a
# request's wall-clock latency (the CPU-time table excludes it): with (1, 5), 59 ms / 34 ms here,
# every policy stayed under 90% even at the lowest rate (1.5 req/s: 0.62-0.73 at load average 8).
SLO_SCALE = (2.0, 10.0)
POLICIES = {  # label -> build_app args of its own
    "fcfs": {"scheduler": "fcfs", "cache_mode": "kv"},
    "vllm": {"scheduler": "vllm", "cache_mode": "kv"},
    "apt": {"scheduler": "apt", "cache_mode": "hybrid", "iteration_shape": "alternate"},
}
# rates (req/s) at REFERENCE_DECODE_STEP_S, seeds and requests per run, by `results` mode
RATES = {"quick": [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5], "full": [0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6.5, 8]}
SEEDS = {"quick": [0, 1, 2], "full": [0, 1, 2, 3, 4]}
REQUESTS = {"quick": 60, "full": 100}
WARMUP_REQUESTS = 4
DESCRIPTION = (
    "One `serve run`-equivalent app per policy (aptray.app.build_app), side by side on loopback, each with the "
    f"CPU engine of the table below: tiny random OPT, {NUM_BLOCKS} blocks of {BLOCK_SIZE} tokens (memory binds), "
    f"max_num_seqs {MAX_NUM_SEQS}, the model in the router's process on one BLAS thread, tokens streamed every step. "
    "Streamed /v1/completions from loadgen's lean HTTP client; TTFT and gaps on the wall clock at the client, from "
    f"each request's scheduled arrival. Per seed: a ShareGPT sample of that seed within the {CONTEXT}-token context "
    "(vLLM's length rule) and Gamma arrivals (CV 1) of that seed; every policy replays the same requests, runs "
    "interleaved across policies. SLOs in units measured through the server at the start (nothing else in flight): "
    "TTFT = 2 x the served TTFT of one full-context prompt, TBT = 10 x the median served gap of 16 requests decoding "
    "together: the engine's own units leave out the serving path, which at this model's speed is not small, and "
    "twice the CPU table's DistServe ratios because other processes' CPU time on the shared machine lands in "
    "wall-clock latency (with the CPU table's ratios every policy stayed under 90% at the lowest rate). "
    "apt: hybrid cache, the paper's alternating iterations; "
    "vllm: vLLM V1's default scheduler (docs/SCHEDULER.md); fcfs: vLLM 0.5's.")


def app_args(model: str, policy: str, ttft: float, tbt: float) -> dict:
    return {"model": model, "num_cache_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "max_num_seqs": MAX_NUM_SEQS,
            "max_num_batched_tokens": CONTEXT, "stream_interval_ms": 0, "use_gpu": False, "max_queue": 1024,
            "ttft_slo_ms": 1e3 * ttft, "tbt_slo_ms": 1e3 * tbt, **POLICIES[policy]}


def start_apps(model: str, policies, ttft: float, tbt: float):
    """Ray + Serve on loopback, one app per policy under /<policy>; returns (base url, stop)."""
    for k, v in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"), ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")):
        os.environ.setdefault(k, v)
    import ray
    from ray import serve

    from aptray.app import build_app
    from aptray.worker.shard import free_port

    ray.init(include_dashboard=False, num_cpus=2 * len(policies) + 2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for p in policies:
        serve.run(build_app(app_args(model, p, ttft, tbt)), name=p, route_prefix=f"/{p}")

    def stop():
        serve.shutdown()
        ray.shutdown()
    return f"http://127.0.0.1:{port}", stop


def wall_step_times(model: str) -> tuple[float, float]:
    """(16-request decode step, full-context prefill) of this engine on the wall clock, one thread."""
    import torch

    from aptray.executor.local import LocalExecutor
    from loadgen.results_cpu import decode_step_time, prefill_time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the router runs it
    try:
        return decode_step_time(model, LocalExecutor), prefill_time(model, LocalExecutor)
    finally:
        torch.set_num_threads(threads)


def served_units(client) -> tuple[float, float]:
    """(TTFT of a lone full-context prompt, median gap of 16 requests decoding together), at the client
    through the server, nothing else in flight: the SLO units of this experiment."""
    from loadgen.traces import TraceRequest
    lone = [TraceRequest(f"unit-ttft-{i}", 0.5 * i, CONTEXT - 1, 1) for i in range(5)]
    ttft = float(np.median([r.ttft for r in client.run(lone).records]))
    together = [TraceRequest(f"unit-tbt-{i}", 0.0, 64, 64) for i in range(16)]
    gaps = [g for r in client.run(together).records for g in r.token_gaps]
    return ttft, float(np.median(gaps))


def per_seed_effective(runs: list[dict], policy: str, seed: int, threshold: float = 0.9) -> tuple[float, bool]:
    """(effective throughput, whether it is only a lower bound: met at the highest rate tried)."""
    from loadgen.sweep import crossing_rate
    curve = {r["rate"]: r["attainment"] for r in runs if r["policy"] == policy and r["seed"] == seed}
    return crossing_rate(curve, threshold), curve[max(curve)] >= threshold


def spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def summarise(runs: list[dict], policies, seeds) -> dict:
    """Per policy: effective throughput per seed and its spread; apt's paired ratios per seed."""
    eff = {p: [per_seed_effective(runs, p, s) for s in seeds] for p in policies}
    out = {p: {"per_seed": [e for e, _ in eff[p]], "lower_bound": any(b for _, b in eff[p]),
               **spread([e for e, _ in eff[p]])} for p in policies}
    ratios = {}
    if "apt" in policies:
        for base in (p for p in policies if p != "apt"):
            pairs = [a / b for (a, _), (b, _) in zip(eff["apt"], eff[base]) if b > 0]
            ratios[f"apt/{base}"] = {"per_seed": pairs, **spread(pairs)} if pairs else None
    return {"effective": out, "ratios": ratios}


def run(mode: str = "quick", policies=tuple(POLICIES), seeds=None, rates=None, num_requests=None,
        log=print, apps=None) -> dict:
    """Every (rate, seed): every policy, through HTTP, on the wall clock. apps: (model, url) of apps
    already started by start_apps (left running), else this starts and stops its own."""
    from loadgen.clients import HttpStreamClient
    from loadgen.metrics import summarize
    from loadgen.results_cpu import dataset_trace, tiny_opt
    from loadgen.traces import TraceRequest, rescale

    seeds = list(SEEDS[mode] if seeds is None else seeds)
    num_requests = num_requests or REQUESTS[mode]
    model = apps[0] if apps else tiny_opt()
    step, prefill = wall_step_times(model)
    scale = REFERENCE_DECODE_STEP_S / step
    rates = [float(f"{r * scale:.3g}") for r in (RATES[mode] if rates is None else rates)]
    bases = {s: dataset_trace(DATASET, num_requests, seed=s) for s in seeds}
    url, stop = (apps[1], lambda: None) if apps else start_apps(model, policies, 1.0, 1.0)
    try:
        clients = {p: HttpStreamClient(f"{url}/{p}", 1.0, 1.0) for p in policies}
        warm = [TraceRequest(f"warm-{i}", 0.05 * i, 16, 8) for i in range(WARMUP_REQUESTS)]
        for p in policies:  # the first requests of an app pay its one-time costs
            clients[p].run(warm)
        served_ttft, served_gap = served_units(clients[policies[0]])
        ttft, tbt = SLO_SCALE[0] * served_ttft, SLO_SCALE[1] * served_gap
        for c in clients.values():  # every request sends these SLOs (aptray_slo) and is judged by them
            c.ttft_slo, c.tbt_slo = ttft, tbt
        log(f"engine (this process): decode step (16 requests) {1e3 * step:.2f} ms, {CONTEXT - 1}-token prefill "
            f"{1e3 * prefill:.1f} ms; served: full-context TTFT {1e3 * served_ttft:.1f} ms, 16-request gap "
            f"{1e3 * served_gap:.2f} ms; SLOs TTFT {1e3 * ttft:.1f} ms, TBT {1e3 * tbt:.1f} ms; rates {rates}")
        out = {"load_average": os.getloadavg()[0],
               "description": DESCRIPTION, "context": CONTEXT, "decode_step_s": step,
               "prefill_s": prefill, "served_ttft_s": served_ttft, "served_gap_s": served_gap, "ttft_slo": ttft,
               "tbt_slo": tbt, "rate_scale": scale, "rates": rates, "seeds": seeds, "num_requests": num_requests,
               "policies": list(policies), "clock": "wall clock at the client", "runs": []}
        k = 0
        for rate in rates:
            for seed in seeds:
                trace = rescale(bases[seed], rate, 1.0, seed)
                for p in list(policies)[k % len(policies):] + list(policies)[:k % len(policies)]:
                    w0 = time.monotonic()
                    res = clients[p].run(trace)
                    s = summarize(res.records, res.duration, context=CONTEXT)
                    row = {"policy": p, "rate": rate, "seed": seed, "attainment": s["attainment"],
                           "attainment_by_slo": s["attainment_by_slo"], "goodput_rps": s["goodput_rps"],
                           "statuses": s["statuses"], "ttft_s": s["ttft_s"], "tbt_s": s["tbt_s"],
                           "preemptions": s["preemptions"], "wall_s": time.monotonic() - w0,
                           **({"errors": s["errors"]} if "errors" in s else {})}
                    out["runs"].append(row)
                    log(f"rate {rate:6.2f} seed {seed} {p:5s} attainment {row['attainment']:.3f} "
                        f"(ttft {s['attainment_by_slo']['ttft']:.2f}, tbt {s['attainment_by_slo']['tbt']:.2f}) "
                        f"{row['wall_s']:.1f} s")
                k += 1
    finally:
        stop()
    out.update(summarise(out["runs"], policies, seeds))
    out["load_average_after"] = os.getloadavg()[0]
    return out
