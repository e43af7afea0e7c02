"""Routing across served replicas, through HTTP: Serve's default router against aptray's, same run.

    python -m loadgen.bench_routing --replicas 2,3

For each replica count, one Ray cluster on this machine serves two copies of the app side by side
(the same args but the router): /p2c with Serve's default request router, /slo with aptray's
(aptray/serve/slo_router.py), /slo-eq with aptray's counting predictions within a tenth of the SLO
as equal (`routing_equal_ttft_fraction`, the fewest requests in flight first among them). Rate by
rate, the same trace goes to each twice, in the order A B C C B A (reversed every other rate), so
that a drift of the served system or the machine falls alike on all; attainment is over both
passes. With --together each pass sends the trace to every router at once instead: whatever drifts
over minutes then falls on all routers alike, and each router's replicas share the cores with the
others'. On these 2 cores two passes of one router on the same requests can differ by more than
the routers do (docs/SERVING.md, "Routing and autoscaling across replicas"). With --chunks K each
pass is cut into K runs of consecutive arrivals, each starting at time 0 on an idle system, and
the routers take turns chunk by chunk (the order reversed at each chunk and at each pass, so that
a chunk's second pass runs the routers in the reverse order of its first), so that they replay the
same requests within a minute of each other. Before the first rate each app serves the first
WARMUP_REQUESTS requests of the trace once, unmeasured.
Requests go through streaming HTTP (loadgen.clients.HttpStreamClient, which sends each request's
TTFT SLO in the body and as the x-aptray-ttft-ms header).

The workload: ShareGPT lengths within the tiny model's 512-token context (loadgen.results_cpu's
model and length rule), token-id prompts, Gamma arrivals at CV 4, and per-request SLOs of two
classes, half each at random: "tight" (TTFT = TIGHT_TTFT full-context prefills + TTFT_ALLOWANCE_S,
TBT = TIGHT_TBT decode steps + TBT_ALLOWANCE_S) and "relaxed" (RELAXED x both). Prefill and decode
step are this machine's, measured at the start as results_cpu does (CPU time of the engine's
thread); the allowances are the serving path's (proxy, ingress, Redis, one SSE event per token),
which a CPU-time step does not see: at 0.5 req/s here, TTFT p90 was ~0.1-0.15 s and the per-request
P99 gap ~20 ms (median) to ~50-120 ms (p90) through HTTP. Rates are absolute (req/s): through Serve
on two shared cores the serving path, not the engine, sets the scale (docs/SERVING.md).

Writes docs/results/routing-cpu.json and re-renders docs/results/routing.md (the section of
docs/RESULTS.md on routing; loadgen.results_routing adds the simulated part).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import replace

import numpy as np

from aptray.serve.args import CPUS_PER_RANK, INGRESS_CPUS
from loadgen.metrics import summarize
from loadgen.results_routing import render
from loadgen.sweep import crossing_rate
from loadgen.traces import TraceRequest, rescale

EQUAL_FRACTION = 0.1
ROUTER_ARGS = {"p2c": {"routing": "default"}, "slo": {"routing": "slo"},  # route prefix -> the app's args
               "slo-eq": {"routing": "slo", "routing_equal_ttft_fraction": EQUAL_FRACTION}}
ROUTERS = tuple(ROUTER_ARGS)
TIGHT_TTFT, TIGHT_TBT, RELAXED = 4.0, 8.0, 4.0
TTFT_ALLOWANCE_S, TBT_ALLOWANCE_S = 0.1, 0.06
CV = 4.0
APP_ARGS = {"scheduler": "apt", "cache_mode": "hybrid", "num_cache_blocks": 96, "max_num_seqs": 32,
            "max_queue": 1024, "use_gpu": False, "stream_interval_ms": 0}
OUT_DIR = "docs/results"
WARMUP_REQUESTS = 10


def slo_trace(num_requests: int, prefill_s: float, step_s: float, seed: int = 0) -> list[TraceRequest]:
    """ShareGPT lengths within the 512-token context, each with a tight or a relaxed SLO."""
    from loadgen.results_cpu import dataset_trace
    base = dataset_trace("sharegpt", num_requests, seed)
    tight = np.random.default_rng(seed + 1).random(len(base)) < 0.5
    out = []
    for r, t in zip(base, tight):
        scale = 1.0 if t else RELAXED
        out.append(replace(r, prompt=None, ttft_slo=scale * (TIGHT_TTFT * prefill_s + TTFT_ALLOWANCE_S),
                           tbt_slo=scale * (TIGHT_TBT * step_s + TBT_ALLOWANCE_S)))
    return out


def cluster_cpus(replicas: int, routers) -> int:
    """Ray CPUs for one app per router. They are logical here: each replica holds its ingress's and
    its router's (the model runs in the router), and every app's replicas must be placed at once."""
    return 4 + math.ceil((INGRESS_CPUS + CPUS_PER_RANK) * replicas * len(routers))


def start_apps(replicas: int, model: str, num_cpus: int, routers=ROUTERS) -> tuple[str, callable]:
    """Ray, Serve's HTTP proxy and one app per router (/p2c, /slo, ...); returns (base url, stop)."""
    import ray
    from ray import serve

    from aptray.app import build_app
    from aptray.worker.shard import free_port

    ray.init(include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    port = free_port()
    # CV 4 leaves gaps of many seconds between bursts: a keep-alive connection the proxy closed after its
    # default 5 s idle would fail the next request sent on it (a client artifact, not a lost request)
    serve.start(http_options={"host": "127.0.0.1", "port": port, "keep_alive_timeout_s": 600})
    for name in routers:
        serve.run(build_app({**APP_ARGS, "model": model, "num_replicas": replicas, **ROUTER_ARGS[name]}),
                  name=name, route_prefix=f"/{name}")

    def stop():
        serve.shutdown()
        ray.shutdown()
    return f"http://127.0.0.1:{port}", stop


def routed_counts(url: str) -> dict:
    """aptray_routed_requests_total by reason from the app's /metrics (an empty dict for /p2c)."""
    import httpx
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m.group(1): int(float(m.group(2)))
            for m in re.finditer(r'aptray_routed_requests_total\{reason="([^"]+)"\} (\S+)', text)}


def store_write_buckets(app: str) -> dict[float, int]:
    """aptray_store_write_seconds of the app's live routers, summed: bucket bound (s) -> writes at or under it."""
    import ray

    from aptray.serve.ingress import ROUTER_NAME
    prefix = ROUTER_NAME.split("{replica}")[0].format(app=app)
    routers = [ray.get_actor(a["name"], namespace=a["namespace"])
               for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    total: dict[float, int] = {}
    for text in ray.get([r.metrics_text.remote() for r in routers]):
        for m in re.finditer(r'aptray_store_write_seconds_bucket\{le="([^"]+)"\} (\S+)', text.decode()):
            total[float(m.group(1))] = total.get(float(m.group(1)), 0) + int(float(m.group(2)))
    return total


def slow_writes(before: dict[float, int], after: dict[float, int]) -> dict[str, int]:
    """Writes between two store_write_buckets readings: all, and those over 0.1 s and over 1 s."""
    new = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    n = new.get(float("inf"), 0)
    return {"writes": n, "over_0.1s": n - new.get(0.1, 0), "over_1s": n - new.get(1.0, 0)}


def replay_together(base_url: str, names, trace) -> dict:
    """The same trace to each router of names at once (one client thread each): name -> RunResult."""
    from concurrent.futures import ThreadPoolExecutor

    from loadgen.clients import HttpStreamClient
    with ThreadPoolExecutor(len(names)) as pool:
        runs = {name: pool.submit(HttpStreamClient(f"{base_url}/{name}", timeout=120.0).run, trace) for name in names}
        return {name: run.result() for name, run in runs.items()}


def chunked(trace: list[TraceRequest], k: int) -> list[list[TraceRequest]]:
    """k runs of consecutive arrivals, each starting at time 0."""
    out = []
    for part in np.array_split(np.arange(len(trace)), k):
        t0 = trace[part[0]].arrived_at
        out.append([replace(trace[i], arrived_at=trace[i].arrived_at - t0) for i in part])
    return out


def schedule(routers: tuple[str, ...], k: int, together: bool, chunks: int) -> list[tuple[tuple[str, ...], int]]:
    """(routers at once, chunk index) in the order they run at the k-th rate: two passes over the trace,
    chunk by chunk, the order reversed at each chunk, at each pass and at every other rate: each chunk
    runs A B C in one pass and C B A in the other, so that an order effect falls on all alike (with
    an even number of chunks, reversing at each chunk alone gave a chunk the same order in both)."""
    if together:
        return [(routers, c) for _ in range(2) for c in range(chunks)]
    return [((name,), c) for p in range(2) for c in range(chunks)
            for name in (routers if (k + p + c) % 2 == 0 else routers[::-1])]


def run_rate(base_url: str, trace, rate: float, steps: list[tuple[tuple[str, ...], int]]) -> dict:
    """Each (group of routers, chunk) of `steps` in turn (a group's routers at once on the chunk of the
    trace at this rate); per router, the summary of all its passes."""
    records, passes, routed, writes = {}, {}, {}, {}
    parts = chunked(rescale(trace, rate, CV, seed=0), 1 + max(c for _, c in steps))
    for names, c in steps:
        before = {name: routed_counts(f"{base_url}/{name}") for name in names}
        buckets = {name: store_write_buckets(name) for name in names}
        began = time.strftime("%H:%M:%S")
        results = replay_together(base_url, names, parts[c])
        time.sleep(1.5)  # the routers publish their counts every second
        for name, res in results.items():
            after = routed_counts(f"{base_url}/{name}")
            new = {k: v - before[name].get(k, 0) for k, v in after.items()}
            slow = slow_writes(buckets[name], store_write_buckets(name))
            s = summarize(res.records, res.duration)
            records.setdefault(name, []).extend(res.records)
            passes.setdefault(name, []).append(s["attainment"])
            for k, v in new.items():
                routed.setdefault(name, {})[k] = routed.get(name, {}).get(k, 0) + v
            for k, v in slow.items():
                writes.setdefault(name, {})[k] = writes.get(name, {}).get(k, 0) + v
            print(f"  {began} {name:4s} rate {rate:6.2f} chunk {c}: attainment {s['attainment']:.3f} statuses {s['statuses']} "
                  f"TTFT p50/p90 {1e3 * s['ttft_s']['p50']:.0f}/{1e3 * s['ttft_s']['p90']:.0f} ms routed {new} "
                  f"Redis writes over 0.1/1 s: {slow['over_0.1s']}/{slow['over_1s']} of {slow['writes']}"
                  + (f" errors {s['errors']}" if "errors" in s else ""), flush=True)
    out = {}
    for name, recs in records.items():
        s = summarize(recs)
        out[name] = {"attainment": s["attainment"], "passes": passes[name], "statuses": s["statuses"],
                     "ttft_s": s["ttft_s"], "tbt_p99_per_request_s": s["tbt_p99_per_request_s"],
                     "routed": routed.get(name, {}), "store_writes": writes.get(name, {}),
                     **({"errors": s["errors"]} if "errors" in s else {})}
    return out


def warm_up(base_url: str, routers, trace, rate: float, requests: int = WARMUP_REQUESTS) -> None:
    """Each app serves the first requests of the trace once, unmeasured, so that no router's first
    measured chunk is its app's first traffic."""
    for name in routers:
        res = replay_together(base_url, (name,), rescale(trace, rate, CV, seed=0)[:requests])[name]
        print(f"  warm-up {name}: {summarize(res.records, res.duration)['statuses']}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", default="2,3")
    p.add_argument("--rates", default="0.5,1,2,3", help="request rates (req/s)")
    p.add_argument("--num-requests", type=int, default=80, help="requests per pass (each router makes two)")
    p.add_argument("--routers", default=",".join(ROUTERS), help=f"some of {','.join(ROUTERS)}")
    p.add_argument("--together", action="store_true",
                   help="each pass sends the trace to every router at once, so that whatever drifts over minutes falls "
                        "on all alike (each router's replicas then share the cores with the others')")
    p.add_argument("--chunks", type=int, default=1,
                   help="cut each pass into this many runs of consecutive arrivals and let the routers take turns "
                        "chunk by chunk, so that whatever drifts over minutes falls on all alike")
    p.add_argument("--out-dir", default=OUT_DIR)
    a = p.parse_args(argv)
    import torch

    from loadgen import results_cpu
    torch.set_num_threads(1)
    t0, stamp = time.time(), time.strftime("%Y-%m-%d %H:%M")
    model = results_cpu.tiny_opt()
    step, prefill = results_cpu.decode_step_time(model), results_cpu.prefill_time(model)
    rates = [float(r) for r in a.rates.split(",")]
    routers = tuple(a.routers.split(","))
    if not set(routers) <= set(ROUTERS):
        p.error(f"--routers: some of {ROUTERS}")
    if not 1 <= a.chunks <= a.num_requests:
        p.error("--chunks: from 1 to --num-requests")
    trace = slo_trace(a.num_requests, prefill, step)
    slos = {"tight_ttft_s": TIGHT_TTFT * prefill + TTFT_ALLOWANCE_S, "tight_tbt_s": TIGHT_TBT * step + TBT_ALLOWANCE_S,
            "relaxed": RELAXED, "tight_ttft_prefills": TIGHT_TTFT, "ttft_allowance_s": TTFT_ALLOWANCE_S,
            "tight_tbt_steps": TIGHT_TBT, "tbt_allowance_s": TBT_ALLOWANCE_S}
    print(f"decode step {1e3 * step:.2f} ms, {results_cpu.CONTEXT - 1}-token prefill {1e3 * prefill:.1f} ms; "
          f"tight SLOs TTFT {1e3 * slos['tight_ttft_s']:.0f} ms TBT {1e3 * slos['tight_tbt_s']:.0f} ms", flush=True)
    out = {"command": "python -m loadgen.bench_routing " + " ".join(sys.argv[1:] if argv is None else argv),
           "stamp": stamp, "decode_step_s": step, "prefill_s": prefill, "cv": CV, "num_requests": a.num_requests,
           "app_args": APP_ARGS, "routers": {name: ROUTER_ARGS[name] for name in routers}, "slos": slos,
           "together": a.together, "chunks": a.chunks, "runs": {}}
    for n in (int(x) for x in a.replicas.split(",")):
        print(f"{n} replicas", flush=True)
        url, stop = start_apps(n, model, num_cpus=cluster_cpus(n, routers), routers=routers)
        try:
            warm_up(url, routers, trace, rates[0])
            curves = {}
            for k, rate in enumerate(rates):
                curves[str(rate)] = run_rate(url, trace, rate, schedule(routers, k, a.together, a.chunks))
        finally:
            stop()
        eff = {name: crossing_rate({float(r): c[name]["attainment"] for r, c in curves.items()}) for name in routers}
        out["runs"][str(n)] = {"rates": curves, "effective_throughput_rps": eff}
        print(f"{n} replicas: effective throughput {eff}", flush=True)
        out["elapsed_s"] = time.time() - t0
        os.makedirs(a.out_dir, exist_ok=True)
        with open(os.path.join(a.out_dir, "routing-cpu.json"), "w") as f:  # after each count: a later one may fail
            json.dump(out, f, indent=1)
    print(render(a.out_dir))


if __name__ == "__main__":
    main()
