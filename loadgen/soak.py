"""Bounded soak: load at 80% of the effective throughput through the HTTP API for N minutes.

    python -m loadgen.soak --minutes 10                  # starts a local app (loopback), measures, soaks
    python -m loadgen.soak --minutes 3 --rate 4          # a given effective throughput (req/s)
    python -m loadgen.soak --url http://127.0.0.1:8000 --api-key K --rate 4   # a running app (loopback)
    python -m loadgen.soak --probe 16,32,48                # attainment at these rates only, no soak

Pass criteria (exit status 1 otherwise): no request lost (each ends with a finish or an explicit
error), memory of the app's processes grows by under 5% from the first window to the last, no
cache block held once the load has drained, and SLO attainment stable (max - min over the windows
within --stability). Everything is bounded: requests sent, requests in flight, time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx
import numpy as np
import psutil

from loadgen.arrivals import arrival_times
from loadgen.metrics import FINISHED, RequestRecord, attainment, percentiles

PROMPTS = ["The quick brown fox", "What is the capital of France?", "def add(a, b):", "Once upon a time",
           "Summarise the following text in one line:", "Translate to French: good morning"]
APP_TITLES = ("ray::ServeReplica:aptray", "ray::Router", "ray::ShardWorker")
MAX_IN_FLIGHT = 256


# -- the app ------------------------------------------------------------------------------------
def start_local_app(tp: int, num_cpus: int, api_key: str | None):
    """Ray + Serve + aptray on loopback; returns (url, stop)."""
    import os
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from aptray.app import build_app
    from aptray.worker.shard import free_port

    ray.init(include_dashboard=False, num_cpus=num_cpus, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"tensor_parallel_size": tp, "num_cache_blocks": 256, "max_num_seqs": 32, "max_queue": 512,
            "use_gpu": False, **({"api_keys": api_key} if api_key else {})}
    serve.run(build_app(args), name="aptray", route_prefix="/")

    def stop():
        serve.shutdown()
        ray.shutdown()
    return f"http://127.0.0.1:{port}", stop


def app_rss_bytes() -> int:
    """Resident memory of this process's descendants that are the app (ingress, router, shards)."""
    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(APP_TITLES):
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def metric(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    return None


# -- load ---------------------------------------------------------------------------------------
async def one_request(c: httpx.AsyncClient, url: str, headers: dict, i: int, at: float, t0: float,
                      max_tokens: int, ttft_slo: float, tbt_slo: float, timeout: float) -> RequestRecord:
    """One streamed completion; status finished / failed (explicit error) / rejected (4xx, 503) /
    unfinished (no finish and no error: lost)."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0.0, "aptray_slo": {"ttft_ms": ttft_slo * 1000, "tbt_ms": tbt_slo * 1000}}
    times, status = [], "unfinished"
    try:
        async with asyncio.timeout(timeout):
            async with c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    status = "rejected" if r.status_code in (429, 503) else "failed"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or line.strip() == "data: [DONE]":
                            continue
                        ev = json.loads(line[5:])
                        if "error" in ev:
                            status = "failed"
                            break
                        times.append(time.perf_counter() - t0)
                        if ev["choices"][0]["finish_reason"]:
                            status = FINISHED
                            break
    except (httpx.HTTPError, TimeoutError):
        pass  # a broken stream or a hang, with no explicit error: stays "unfinished" (lost)
    return RequestRecord.from_token_times(str(i), at, 0, max_tokens, ttft_slo, tbt_slo, times, status)


async def run_load(url: str, headers: dict, rate: float, duration_s: float, seed: int, ttft_slo: float,
                   tbt_slo: float, on_tick=None, tick_s: float = 10.0) -> list[RequestRecord]:
    n = max(1, int(rate * duration_s))
    arrivals = arrival_times(rate, 1.0, n, seed)
    lengths = np.random.default_rng(seed).integers(16, 65, size=n)
    sem = asyncio.Semaphore(MAX_IN_FLIGHT)
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        next_tick, tasks = tick_s, []

        async def bounded(i):
            async with sem:
                return await one_request(c, url, headers, i, float(arrivals[i]), t0, int(lengths[i]),
                                         ttft_slo, tbt_slo, timeout=300)
        for i, at in enumerate(arrivals):
            while (now := time.perf_counter() - t0) < at:
                await asyncio.sleep(min(at - now, 0.05))
                if on_tick is not None and now >= next_tick:
                    on_tick(now)
                    next_tick += tick_s
            tasks.append(asyncio.create_task(bounded(i)))
        return list(await asyncio.gather(*tasks))


def measure_rate(url: str, headers: dict, ttft_slo: float, tbt_slo: float, target: float = 0.9,
                 probe_s: float = 20.0, max_probes: int = 10) -> float:
    """Effective throughput: the highest rate (doubling from 1 req/s, then one bisection step)
    whose attainment is at least target. Bounded by max_probes + 1 probes; raises if even the
    last rate (2**(max_probes-1) req/s) attains it, since 80% of a lower bound is no measurement."""
    good, rate, bad = 0.0, 1.0, None
    for _ in range(max_probes):
        a = attainment(asyncio.run(run_load(url, headers, rate, probe_s, 1, ttft_slo, tbt_slo)))
        print(f"probe {rate:.2f} req/s: attainment {a:.3f}", flush=True)
        if a < target:
            bad = rate
            break
        good, rate = rate, rate * 2
    if bad is None:
        raise RuntimeError(f"attainment >= {target} up to {good:g} req/s: the effective throughput is above "
                           "the probe range; pass --rate")
    if bad is not None and good > 0:
        mid = (good + bad) / 2
        a = attainment(asyncio.run(run_load(url, headers, mid, probe_s, 2, ttft_slo, tbt_slo)))
        print(f"probe {mid:.2f} req/s: attainment {a:.3f}", flush=True)
        good = mid if a >= target else good
    return good or 0.5


def probe_rates(rates: list[float], url: str, headers: dict, ttft_slo: float, tbt_slo: float,
                probe_s: float = 20.0) -> int:
    """Each rate's attainment, TTFT p50/p90 and the median of its requests' TBT p99s, as one JSON line
    (loadgen.metrics.percentiles: NaN where none had one)."""
    asyncio.run(run_load(url, headers, 4.0, 10.0, 9, ttft_slo, tbt_slo))  # warm-up
    for rate in rates:
        records = asyncio.run(run_load(url, headers, rate, probe_s, 1, ttft_slo, tbt_slo))
        done = [r for r in records if r.status == FINISHED]
        ttft = percentiles((r.ttft for r in records if r.ttft is not None), (50, 90))
        tbt = percentiles((r.tbt_p99 for r in done), (50,))
        print(json.dumps({"rate": rate, "requests": len(records), "finished": len(done),
                          "attainment": round(attainment(records), 3),
                          "ttft_s": {k: round(v, 3) for k, v in ttft.items()},
                          "tbt_p99_per_request_s": {k: round(v, 4) for k, v in tbt.items()}}), flush=True)
    return 0


def windows(records: list[RequestRecord], duration_s: float, n: int) -> list[dict]:
    width = duration_s / n
    out = []
    for w in range(n):
        rs = [r for r in records if w * width <= r.arrived_at < (w + 1) * width]
        out.append({"from_s": w * width, "requests": len(rs), "attainment": attainment(rs)})
    return out


def wait_idle(url: str, headers: dict, timeout_s: float = 60) -> dict:
    deadline = time.time() + timeout_s
    while True:
        text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
        held = {k: metric(text, "aptray_cache_blocks_in_use", '{kind="%s"}' % k) for k in ("kv", "hidden")}
        busy = (metric(text, "aptray_requests_running") or 0) + (metric(text, "aptray_requests_waiting") or 0)
        if (sum(v or 0 for v in held.values()) == 0 and busy == 0) or time.time() > deadline:
            return {"blocks_in_use": held, "requests_left": busy}
        time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=None, help="effective throughput (req/s); default: measured")
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the effective throughput to offer")
    ap.add_argument("--url", default=None, help="a running app on loopback; default: start one")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=3)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--tbt-slo", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--warmup-s", type=float, default=20.0, help="load before the measured soak (not counted)")
    ap.add_argument("--stability", type=float, default=0.1, help="allowed max - min window attainment")
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    ap.add_argument("--probe", default=None, help="comma-separated rates (req/s): probe each as the measurement "
                    "does (20 s, after a 10 s warm-up at 4 req/s), print its attainment and latencies, no soak")
    a = ap.parse_args(argv)
    if a.url and not a.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        ap.error("the soak talks to loopback only")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    url, stop = (a.url, None) if a.url else start_local_app(a.tp, a.num_cpus, a.api_key)
    try:
        if a.probe:
            return probe_rates([float(r) for r in a.probe.split(",")], url, headers, a.ttft_slo, a.tbt_slo)
        effective = a.rate or measure_rate(url, headers, a.ttft_slo, a.tbt_slo)
        rate, duration = a.load * effective, a.minutes * 60
        print(f"soak: {rate:.2f} req/s ({a.load:.0%} of {effective:.2f}) for {duration:.0f} s", flush=True)
        asyncio.run(run_load(url, headers, rate, a.warmup_s, 3, a.ttft_slo, a.tbt_slo))
        samples = []

        def tick(now):
            samples.append((now, app_rss_bytes()))
            print(f"  t={now:5.0f}s app rss {samples[-1][1] / 2**20:.0f} MiB", flush=True)
        t = time.time()
        records = asyncio.run(run_load(url, headers, rate, duration, 7, a.ttft_slo, a.tbt_slo, on_tick=tick))
        wall = time.time() - t
        idle = wait_idle(url, headers)
    finally:
        if stop is not None:
            stop()
    summary = summarize(records, samples, duration, wall, idle, a, rate, effective)
    print(json.dumps(summary, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["pass"] else 1


def summarize(records, samples, duration, wall, idle, a, rate, effective) -> dict:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    wins = windows(records, duration, a.windows)
    att = [w["attainment"] for w in wins if w["requests"]]
    width = duration / a.windows
    first = [m for t, m in samples if t < width] or [m for _, m in samples[:1]]
    last = [m for t, m in samples if t >= duration - width] or [m for _, m in samples[-1:]]
    growth = float((np.mean(last) - np.mean(first)) / np.mean(first)) if first and first[0] else None
    lost = statuses.get("unfinished", 0)
    leaked = sum(v or 0 for v in idle["blocks_in_use"].values())
    checks = {"lost_zero": lost == 0, "no_leaked_blocks": leaked == 0 and idle["requests_left"] == 0,
              "memory_growth_under_limit": growth is None or growth < a.max_growth,
              "attainment_stable": bool(att) and max(att) - min(att) <= a.stability}
    checks = {k: bool(v) for k, v in checks.items()}
    return {"minutes": a.minutes, "wall_s": round(wall, 1), "effective_rps": effective, "offered_rps": rate,
            "requests": len(records), "statuses": statuses, "lost": lost, "attainment": attainment(records),
            "windows": wins, "app_rss_mib": {"first_window": float(np.mean(first)) / 2**20 if first else None,
                                             "last_window": float(np.mean(last)) / 2**20 if last else None},
            "memory_growth": growth, "after_drain": idle, "checks": checks, "pass": all(checks.values())}


if __name__ == "__main__":
    sys.exit(main())
