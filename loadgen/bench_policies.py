"""A small effective-throughput comparison of fcfs, sarathi and apt on the real CPU engine.

Tiny random multi-head OPT (r = 1/2), a cache budget that binds, ShareGPT-like lengths
(lognormal prompt and output lengths scaled to the model's 512-token context), Gamma arrivals
(loadgen.arrivals), SLOs scaled to the measured decode step time, SLO attainment by
loadgen.metrics. Every policy sees the same trace at each rate, in the same run, and the report
gives ratios to fcfs. On a shared machine the absolute numbers move; the ratios measured in one
run are what to read.

    python loadgen/bench_policies.py --rates 20 40 80 --n 60 --out bench_policies.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.executor.local import LocalExecutor
from aptray.model.factory import make_tiny_model
from aptray.sampling_params import SamplingParams
from loadgen.arrivals import arrival_times
from loadgen.metrics import RequestRecord, attainment, goodput
from loadgen.results_cpu import decode_step_time
from loadgen.scratch import scratch_dir

POLICIES = [("fcfs", "kv", {}), ("sarathi", "kv", {}), ("apt", "hybrid", {}),
            ("apt", "hybrid", {"iteration_shape": "mixed"})]


def sharegpt_like(n: int, seed: int, vocab: int = 500) -> list[tuple[list[int], int]]:
    """Lognormal lengths shaped like ShareGPT (median prompt ~ 4x median output is not assumed:
    both medians ~ 1/10 of the real ones, i.e. 20-ish and 25-ish tokens, long tails)."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(24), 0.8, n), 4, 200).astype(int)
    outputs = np.clip(rng.lognormal(np.log(24), 0.7, n), 2, 120).astype(int)
    return [([3] + rng.integers(4, vocab, p - 1).tolist(), int(o)) for p, o in zip(prompts, outputs)]


def make_engine(model: str, policy: str, cache_mode: str, extra: dict, ttft: float, tbt: float) -> Engine:
    config = EngineConfig(model=model, scheduler=policy, cache_mode=cache_mode, block_size=8, num_cache_blocks=96,
                          max_num_seqs=32, max_num_batched_tokens=256, enable_chunked_prefill=True,
                          ttft_slo=ttft, tbt_slo=tbt, **extra)
    return Engine(config, LocalExecutor(config))


def run_trace(engine: Engine, trace, arrivals) -> list[RequestRecord]:
    """Replay the trace in real time; returns one record per request."""
    t0 = time.monotonic()
    todo = list(range(len(trace)))
    records, token_times = {}, {}
    while todo or engine.has_unfinished():
        now = time.monotonic() - t0
        while todo and arrivals[todo[0]] <= now:
            i = todo.pop(0)
            prompt, out = trace[i]
            engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True),
                               arrival_time=t0 + arrivals[i])
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[todo[0]] - (time.monotonic() - t0)))
            continue
        for out in engine.step():
            if out.finished:
                token_times[out.request_id] = out.metrics
    for i, (prompt, n_out) in enumerate(trace):
        m = token_times[str(i)]
        c = engine.config
        records[i] = RequestRecord.from_token_times(str(i), m.arrival_time - t0, len(prompt), n_out, c.ttft_slo,
                                                    c.tbt_slo, [t - t0 for t in m.token_times],
                                                    num_preemptions=m.num_preemptions)
    return list(records.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--out", default="bench_policies.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = make_tiny_model(os.path.join(scratch_dir(), "opt"), arch="opt", hidden_size=128, num_layers=4,
                            num_heads=8, max_positions=512)
    # the unit the SLOs are scaled by: a 16-request decode step, on the wall clock the replay runs on
    step = decode_step_time(model, make_executor=LocalExecutor)
    ttft, tbt = 30 * step, 5 * step  # SLOs scaled to this machine's step time
    print(f"decode step {1e3 * step:.2f} ms -> TTFT SLO {1e3 * ttft:.1f} ms, TBT SLO {1e3 * tbt:.1f} ms", flush=True)
    rows = []
    for rate in args.rates:
        trace = sharegpt_like(args.n, seed=int(rate))
        arrivals = arrival_times(rate, args.cv, args.n, seed=int(rate))
        for policy, mode, extra in POLICIES:
            engine = make_engine(model, policy, mode, extra, ttft, tbt)
            recs = run_trace(engine, trace, arrivals)
            row = {"rate": rate, "policy": policy, "cache_mode": mode, **extra, "attainment": attainment(recs),
                   "goodput": goodput(recs), "stats": dict(engine.scheduler.stats),
                   "alpha": getattr(engine.scheduler, "alpha", None)}
            rows.append(row)
            print(f"rate {rate:5.1f}  {policy:8s} {mode:6s} {extra.get('iteration_shape', ''):6s} "
                  f"attainment {row['attainment']:.2f}  goodput {row['goodput']:.2f} req/s", flush=True)
    summary = {}
    for policy, mode, extra in POLICIES:
        name = f"{policy}-{mode}-{extra.get('iteration_shape', 'alternate' if policy == 'apt' else '')}".rstrip("-")
        mine = [r for r in rows if r["policy"] == policy and r["cache_mode"] == mode
                and r.get("iteration_shape") == extra.get("iteration_shape")]
        ok = [r["rate"] for r in mine if r["attainment"] >= 0.9]
        summary[name] = {"max_rate_at_90pct": max(ok) if ok else 0.0,
                         "attainment": {r["rate"]: r["attainment"] for r in mine}}
    base = summary["fcfs-kv"]["max_rate_at_90pct"]
    for name, s in summary.items():
        s["ratio_to_fcfs"] = s["max_rate_at_90pct"] / base if base else None
        print(f"{name:22s} max tested rate with >= 90% attainment {s['max_rate_at_90pct']:6.1f}  "
              f"ratio to fcfs {s['ratio_to_fcfs']}")
    with open(args.out, "w") as f:
        json.dump({"decode_step_s": step, "ttft_slo": ttft, "tbt_slo": tbt, "cv": args.cv, "n": args.n,
                   "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
