"""Per-iteration control overhead of the router -> shard plan exchange (RayExecutor, TP over gloo).

overhead = router wall time of execute(plan) - the slowest rank's own step time: proto encode,
gRPC to every rank in parallel, decode on the shards, the replies. Rank skew (the slowest rank
minus rank 0) is reported apart: it is compute imbalance, not exchange. Decode-shaped plans (one
token per sequence, realistic block tables) on a tiny model, so compute stays small; an empty
plan measures the bare round trip. --penalized N gives every sequence presence and frequency
penalties over N distinct output tokens: the counts each plan then carries (SeqPlan.output_counts).

    python loadgen/bench_plan_exchange.py --tp 2 --seqs 32 --iters 300
    python loadgen/bench_plan_exchange.py --tp 2 --seqs 32 --iters 300 --penalized 300
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from loadgen.scratch import scratch_dir

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def decode_plan(iteration: int, num_seqs: int, context: int, block_size: int, penalized: int = 0):
    from aptray.plan import BatchPlan, SeqPlan
    per = -(-(context + 1) // block_size)
    counts = (tuple(range(penalized)), tuple(1 + t % 3 for t in range(penalized))) if penalized else ()
    seqs = tuple(SeqPlan(f"r{i}", (5 + i,), context, "kv", tuple(range(i * per, (i + 1) * per)), True,
                         presence_penalty=0.5 if penalized else 0.0, frequency_penalty=0.5 if penalized else 0.0,
                         output_counts=counts)
                 for i in range(num_seqs))
    return BatchPlan(iteration, seqs), per * num_seqs


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--penalized", type=int, default=0, help="distinct penalized output tokens per sequence")
    ap.add_argument("--model", default="")
    ap.add_argument("--json", default="", help="write the summary here")
    args = ap.parse_args()

    import ray

    from aptray.config import EngineConfig
    from aptray.executor.ray import RayExecutor
    from aptray.model.factory import make_tiny_model
    from aptray.plan import BatchPlan
    from aptray.proto.convert import plan_to_proto

    model = args.model or make_tiny_model(os.path.join(scratch_dir(), "tiny"))
    ray.init(include_dashboard=False, num_cpus=max(4, args.tp), log_to_driver=False)
    block_size = 16
    plan0, blocks = decode_plan(0, args.seqs, args.context, block_size, args.penalized)
    config = EngineConfig(model=model, tensor_parallel_size=args.tp, num_cache_blocks=blocks + 8,
                          block_size=block_size)
    executor = RayExecutor(config, use_gpu=False)
    try:
        wall, step, skew, encode, empty = [], [], [], [], []
        for i in range(args.warmup + args.iters):
            plan, _ = decode_plan(i, args.seqs, args.context, block_size, args.penalized)
            t = time.perf_counter()
            plan_to_proto(plan).SerializeToString()
            e = time.perf_counter() - t
            t = time.perf_counter()
            executor.execute(plan)
            w = time.perf_counter() - t
            times = executor.last_step_times
            t = time.perf_counter()
            executor.execute(BatchPlan(i))  # nothing to run: the bare exchange
            z = time.perf_counter() - t
            if i >= args.warmup:
                wall.append(w), step.append(max(times)), skew.append(max(times) - times[0])
                encode.append(e), empty.append(z)
        overhead = [w - s for w, s in zip(wall, step)]
        ms = lambda x: round(1e3 * x, 3)  # noqa: E731
        summary = {"tp": args.tp, "seqs": args.seqs, "context": args.context, "iters": args.iters,
                   "penalized": args.penalized,
                   "plan_bytes": len(plan_to_proto(plan0).SerializeToString()),
                   "overhead_ms_p50": ms(statistics.median(overhead)), "overhead_ms_p99": ms(pct(overhead, 0.99)),
                   "empty_plan_ms_p50": ms(statistics.median(empty)), "empty_plan_ms_p99": ms(pct(empty, 0.99)),
                   "wall_ms_p50": ms(statistics.median(wall)), "slowest_step_ms_p50": ms(statistics.median(step)),
                   "rank_skew_ms_p50": ms(statistics.median(skew)), "encode_ms_p50": ms(statistics.median(encode))}
        print(json.dumps(summary, indent=1))
        print("target p50 <= 2 ms:", "met" if summary["overhead_ms_p50"] <= 2 else "NOT met")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
    finally:
        executor.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
