"""One chunk of the served routing benchmark, replayed many times per router: where the requests went.

    python -m loadgen.replay_chunk --replicas 2 --routers p2c,slo --rate 6 --chunk 0 --replays 8

loadgen.bench_routing's setup (one Ray cluster, one app per router, the same trace, SLOs and
chunks) narrowed to the chunk that decides a comparison: it is replayed --replays times per router,
the routers taking turns (the order reversed each round), each replay on an idle system. Per replay
it prints the attainment, the client's TTFT p50/p90, how many requests each replica served (the
x-aptray-replica header), why the router sent them where it did, and what each replica reported
it adds per relayed stream (stream_s) just before; at the end, per router, the mean attainment and
its spread. Nothing is written: the benchmark's results page is bench_routing's.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

from loadgen import bench_routing
from loadgen.metrics import summarize
from loadgen.traces import rescale

STATS_PROBES = 12  # handle calls per app for the replicas' routing stats (each reaches one replica at random)


def serving_delays(app: str) -> list[float]:
    """The stream_s each replica of the app reports, as far as STATS_PROBES calls reach them."""
    from ray import serve
    handle = serve.get_deployment_handle("Ingress", app)
    return sorted({round(handle.record_routing_stats.remote().result(timeout_s=30).get("stream_s", 0.0), 4)
                   for _ in range(STATS_PROBES)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--routers", default="p2c,slo", help=f"some of {','.join(bench_routing.ROUTERS)}")
    p.add_argument("--rate", type=float, default=6.0, help="request rate (req/s) the trace is scaled to")
    p.add_argument("--num-requests", type=int, default=120, help="requests in the whole trace")
    p.add_argument("--chunks", type=int, default=4, help="the trace is cut into this many chunks")
    p.add_argument("--chunk", type=int, default=0, help="the chunk replayed")
    p.add_argument("--replays", type=int, default=8, help="replays per router")
    a = p.parse_args(argv)
    import torch

    from loadgen import results_cpu
    torch.set_num_threads(1)
    routers = tuple(a.routers.split(","))
    if not set(routers) <= set(bench_routing.ROUTERS) or not 0 <= a.chunk < a.chunks:
        p.error(f"--routers: some of {bench_routing.ROUTERS}; --chunk below --chunks")
    model = results_cpu.tiny_opt()
    step, prefill = results_cpu.decode_step_time(model), results_cpu.prefill_time(model)
    trace = bench_routing.slo_trace(a.num_requests, prefill, step)
    part = bench_routing.chunked(rescale(trace, a.rate, bench_routing.CV, seed=0), a.chunks)[a.chunk]
    tight = bench_routing.TIGHT_TTFT * prefill + bench_routing.TTFT_ALLOWANCE_S
    print(f"decode step {1e3 * step:.2f} ms, prefill {1e3 * prefill:.1f} ms; tight TTFT {1e3 * tight:.0f} ms; "
          f"chunk {a.chunk}: {len(part)} requests over {part[-1].arrived_at:.2f} s", flush=True)
    url, stop = bench_routing.start_apps(a.replicas, model, bench_routing.cluster_cpus(a.replicas, routers), routers)
    attained: dict[str, list[float]] = {name: [] for name in routers}
    try:
        bench_routing.warm_up(url, routers, trace, a.rate)
        for k in range(a.replays):
            for name in (routers if k % 2 == 0 else routers[::-1]):
                delays = serving_delays(name)
                before = bench_routing.routed_counts(f"{url}/{name}")
                began = time.strftime("%H:%M:%S")
                res = bench_routing.replay_together(url, (name,), part)[name]
                time.sleep(1.5)  # the routers publish their counts every second
                after = bench_routing.routed_counts(f"{url}/{name}")
                s = summarize(res.records, res.duration)
                attained[name].append(s["attainment"])
                split = sorted(Counter(r.replica or "?" for r in res.records).values(), reverse=True)
                print(f"  {began} {name:6s} replay {k}: attainment {s['attainment']:.3f} (TTFT {s['attainment_by_slo']['ttft']:.3f}, TBT {s['attainment_by_slo']['tbt']:.3f}) TTFT p50/p90 "
                      f"{1e3 * s['ttft_s']['p50']:.0f}/{1e3 * s['ttft_s']['p90']:.0f} ms split {split} "
                      f"routed {({r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)})} "
                      f"stream_s before {delays} statuses {s['statuses']}", flush=True)
    finally:
        stop()
    for name, xs in attained.items():
        print(f"{name}: mean attainment {statistics.mean(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, "
              f"sd {statistics.pstdev(xs):.3f}) over {len(xs)} replays")


if __name__ == "__main__":
    main()
