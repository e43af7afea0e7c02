"""Where the serving path spends CPU: per-process CPU time under a fixed load, optionally py-spy.

  python -m loadgen.profile_serving --rate 24 --seconds 12 [--tokens 2] [--py-spy DIR] [--app-args '{}']

Starts the app on loopback as loadgen.bench_http_vs_engine does, warms it up, then replays the
soak's workload at --rate through the lean HTTP client and prints, per process (Serve's proxy,
the ingress replica, the router, shard actors, this client), the CPU seconds it used and that
per request and per token. --tokens fixes every request's output length (2 isolates the
per-request cost). --py-spy DIR records each app process with `py-spy record --format raw`
(collapsed stacks, one file per process; `pip install py-spy`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import replace

import numpy as np
import psutil

from loadgen.bench_http_vs_engine import APP_ARGS, soak_workload, start_app
from loadgen.clients import HttpStreamClient
from loadgen.metrics import attainment

APP_PROCESSES = ("ray::ProxyActor", "ray::ServeReplica", "ray::Router", "ray::ShardWorker")


def app_processes() -> dict[str, psutil.Process]:
    """This process's descendants that serve requests, by a short name, plus this client."""
    out = {"client": psutil.Process()}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for title in APP_PROCESSES:
            if cmd.startswith(title):
                out[f"{title.removeprefix('ray::')}-{p.pid}"] = p
    return out


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=24.0)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--tokens", type=int, default=None, help="every request's output length (default: 16-64)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--app-args", default="{}", help="JSON of extra build_app args")
    ap.add_argument("--num-cpus", type=int, default=3)
    ap.add_argument("--py-spy", default=None, metavar="DIR", help="record each app process with py-spy into DIR")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from aptray.model.demo import DEMO_MODEL, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEMO_MODEL))
    url, stop = start_app({**APP_ARGS, **json.loads(args.app_args)}, args.num_cpus)
    try:
        client = HttpStreamClient(url, 1.0, 0.25)
        client.run(soak_workload(4, 3, args.seed + 1, tokenizer))  # warm-up
        trace = soak_workload(args.rate, args.seconds, args.seed, tokenizer)
        if args.tokens:
            trace = [replace(r, num_decode_tokens=args.tokens) for r in trace]
        procs = app_processes()
        spies = []
        if args.py_spy:
            os.makedirs(args.py_spy, exist_ok=True)
            for name, p in procs.items():
                if name != "client":
                    spies.append(subprocess.Popen(
                        ["py-spy", "record", "--nonblocking", "--threads", "-r", "100", "-d", str(int(args.seconds)),
                         "-p", str(p.pid), "-f", "raw", "-o", os.path.join(args.py_spy, f"{name}.txt")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        before = {name: cpu_seconds(p) for name, p in procs.items()}
        t = time.time()
        records = client.run(trace).records
        wall = time.time() - t
        used = {name: cpu_seconds(p) - before[name] for name, p in procs.items()}
        for s in spies:
            s.wait()
    finally:
        stop()
    tokens = sum(r.num_tokens for r in records)
    ttft = np.percentile([r.ttft for r in records if r.ttft is not None], [50, 99]) * 1e3
    gaps = np.percentile([g for r in records for g in r.token_gaps] or [0], [50, 99]) * 1e3
    print(f"{len(records)} requests, {tokens} tokens in {wall:.1f} s; attainment {attainment(records):.3f}; "
          f"TTFT p50/p99 {ttft[0]:.0f}/{ttft[1]:.0f} ms, token gaps p50/p99 {gaps[0]:.1f}/{gaps[1]:.1f} ms")
    print(f"{'process':28s} {'cpu s':>7s} {'ms/request':>11s} {'ms/token':>9s}")
    for name, s in sorted(used.items(), key=lambda kv: -kv[1]):
        print(f"{name:28s} {s:7.2f} {s / len(records) * 1e3:11.2f} {s / max(1, tokens) * 1e3:9.3f}")
    total = sum(used.values())
    print(f"{'total':28s} {total:7.2f} {total / len(records) * 1e3:11.2f} {total / max(1, tokens) * 1e3:9.3f}"
          f"   ({total / wall:.2f} cores)")


if __name__ == "__main__":
    main()
