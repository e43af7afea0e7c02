"""Time one scheduling decision with 1,000 and 10,000 waiting + running requests, and a whole
iteration's scheduler work (decision plus update) at a serving-sized population (torch-free).

Times are the thread's CPU time (time.thread_time), because the development machine is shared
and oversubscribed: wall time there measures the neighbours; the wall median is recorded too.
The scheduler is driven in steady state by an instant executor (one token per sampled sequence,
a synthetic step time so the apt cost model calibrates); schedule(now) and update(plan, result, now)
are timed apart (update: recording the tokens, publishing blocks, and apt's step-cost refit).
Requests never finish during the run (max_tokens is large), so the population stays at its size.

Python's cyclic GC is frozen after the scheduler is built and before the requests arrive, as the
server does after start-up (aptray.serve.engine_loop, aptray.llm: gc.collect(); gc.freeze(), as
vLLM does); `--gc on` leaves it as a plain process has it; `--gc off` also disables the collector
while the requests run, which shows its share of the tail.

    python -m loadgen.bench_scheduler --out bench_scheduler.json
    python -m loadgen.bench_scheduler --sizes 64 --max-num-seqs 32   # a CPU replica's population
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.plan import StepResult
from aptray.request import Request
from aptray.sampling_params import SamplingParams
from aptray.scheduler import make_scheduler
from loadgen.scratch import scratch_dir


def tiny_opt_config_dir() -> str:
    """A config.json is all the scheduler needs of a model (OPT-13B's shape: r = 1/2)."""
    path = scratch_dir("bench-sched-")
    cfg = dict(model_type="opt", hidden_size=5120, num_attention_heads=40, num_hidden_layers=40, ffn_dim=20480,
               vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=5120)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def bench(model_dir: str, policy: str, shape: str, cache_mode: str, n: int, max_num_seqs: int, iters: int,
          seed: int = 0, freeze_gc: bool = True, samples: list | None = None) -> dict:
    """One case; samples (optional): gets (waiting, running, seconds) of each decision after the first,
    the counts as the decision left them."""
    rng = random.Random(seed)
    config = EngineConfig(model=model_dir, scheduler=policy, cache_mode=cache_mode, iteration_shape=shape,
                          block_size=16, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                          ttft_slo=1.0, tbt_slo=0.2)
    # room for the running set to grow while the waiting set stays queued
    num_blocks = max_num_seqs * 24 + 64
    blocks = BlockManager(num_blocks, config.block_size, config.hidden_block_size if cache_mode != "kv" else 0)
    sched = make_scheduler(config, blocks)
    if freeze_gc:  # what start-up leaves is frozen; the requests come after
        gc.collect()
        gc.freeze()
    now = 0.0
    for i in range(n):
        prompt = [rng.randrange(50000) for _ in range(rng.randint(16, 300))]
        sched.add(Request(f"r{i}", prompt, SamplingParams(max_tokens=10**6), now - rng.random() * 2, 1.0, 0.2))
    times, walls, full, updates = [], [], [], []  # full: the decision was made with max_num_seqs running
    for it in range(iters):
        full.append(len(sched.running) == max_num_seqs)
        t0, w0 = time.thread_time(), time.perf_counter()
        plan = sched.schedule(now)
        times.append(time.thread_time() - t0)
        walls.append(time.perf_counter() - w0)
        if samples is not None and it > 0:
            samples.append((len(sched.waiting), len(sched.running), times[-1]))
        kv = sum(len(s.block_table) for s in plan.seqs if s.cache_kind == "kv")
        hid = sum(len(s.block_table) for s in plan.seqs if s.cache_kind == "hidden")
        step = 2e-3 + 2e-6 * plan.num_tokens + 1e-6 * kv + 3e-6 * hid
        now += step
        result = StepResult({s.request_id: 1 for s in plan.seqs if s.sample}, step)
        t0 = time.thread_time()
        sched.update(plan, result, now)
        updates.append(time.thread_time() - t0)
    # the first decision also indexes every queued arrival once (apt: ~2 us each; a serving loop
    # pays that as requests arrive): reported apart, the percentiles are over the decisions after it
    first_ms = 1e3 * times[0]
    at_full = sorted(t for t, f in zip(times[1:], full[1:]) if f)
    steady, walls = sorted(times[1:]), sorted(walls[1:])
    return {"policy": policy, "shape": shape, "cache_mode": cache_mode, "requests": n,
            "max_num_seqs": max_num_seqs, "running_at_end": len(sched.running), "iterations": iters,
            "first_ms": first_ms, "median_ms": 1e3 * statistics.median(steady),
            "p99_ms": 1e3 * steady[min(len(steady) - 1, int(0.99 * len(steady)))], "max_ms": 1e3 * steady[-1],
            "wall_median_ms": 1e3 * statistics.median(walls),
            "update_median_ms": 1e3 * statistics.median(updates[1:]),
            # a whole iteration's scheduler work: what the engine loop spends beside the step
            "iteration_median_ms": 1e3 * statistics.median(map(sum, zip(times[1:], updates[1:]))),
            # the decisions made while max_num_seqs requests ran (the filling-up ones, which admit tens
            # of requests each, left out): what "n queued with max_num_seqs running" means
            "full_decisions": len(at_full),
            "full_median_ms": 1e3 * statistics.median(at_full) if at_full else None,
            "full_p99_ms": 1e3 * at_full[min(len(at_full) - 1, int(0.99 * len(at_full)))] if at_full else None}


CASES = [("apt", "alternate", "hybrid"), ("apt", "mixed", "hybrid"), ("apt", "alternate", "kv"),
         ("sarathi", "alternate", "kv"), ("fcfs", "alternate", "kv"), ("vllm", "alternate", "kv")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--max-num-seqs", type=int, nargs="+", default=None,
                    help="running-set caps to try (default: 256 and half the population)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="bench_scheduler.json")
    ap.add_argument("--gc", choices=("frozen", "on", "off"), default="frozen",
                    help="frozen: gc.freeze() after start-up, as the server does; on: a plain process's GC; "
                         "off: frozen, and the collector disabled while the requests run")
    ap.add_argument("--policies", default="apt,sarathi,fcfs,vllm", help="which of the cases to run")
    args = ap.parse_args(argv)
    model_dir = tiny_opt_config_dir()
    cases = [c for c in CASES if c[0] in args.policies.split(",")]
    rows = []
    for n in args.sizes:
        for max_num_seqs in args.max_num_seqs or (256, n // 2):
            for policy, shape, mode in cases:
                if args.gc == "off":
                    gc.disable()
                row = bench(model_dir, policy, shape, mode, n, max_num_seqs, args.iters, freeze_gc=args.gc != "on")
                gc.enable()
                rows.append(row)
                print(f"{policy:8s} {shape:9s} {mode:6s} n={n:6d} max_num_seqs={max_num_seqs:5d} "
                      f"running={row['running_at_end']:5d}  median {row['median_ms']:7.3f} ms  "
                      f"p99 {row['p99_ms']:7.3f} ms  max {row['max_ms']:7.3f} ms  first {row['first_ms']:7.3f} ms  "
                      f"with {max_num_seqs} running: median {row['full_median_ms'] or 0:7.3f} p99 {row['full_p99_ms'] or 0:7.3f} "
                      f"(wall median {row['wall_median_ms']:.3f})  update median {row['update_median_ms']:.3f} ms  "
                      f"iteration median {row['iteration_median_ms']:.3f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump({"python": sys.version.split()[0], "gc": args.gc, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
