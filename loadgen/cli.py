"""The commands of python -m loadgen (tokenizer, trace, run, calibrate, sweep, results), run by the name
loadgen.arguments parses; loadgen.run_setup builds what each run needs."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from loadgen.arguments import build_parser
from loadgen.run_setup import base_trace, context_of, make_client, parse_policy


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# -- commands ------------------------------------------------------------------------------------
def cmd_tokenizer(args) -> None:
    from loadgen.tokenizer import sharegpt_texts, train_bpe_tokenizer
    train_bpe_tokenizer(args.out, list(sharegpt_texts(args.conversations)), args.vocab_size)
    print(args.out)


def cmd_trace(args) -> None:
    from loadgen.traces import write_trace
    trace = base_trace(args, args.rate)
    write_trace(args.out, trace)
    print(f"{len(trace)} requests -> {args.out}")


def cmd_run(args) -> None:
    from tqdm import tqdm

    from loadgen.metrics import summarize
    from loadgen.traces import rescale
    trace = base_trace(args, args.rate or 1.0)
    if args.trace and args.rate:  # a given trace keeps its own arrivals unless a rate is asked
        trace = rescale(trace, args.rate, args.cv, args.seed)
    client = make_client(args, args.policy)
    with tqdm(total=len(trace), desc=f"{args.policy}", unit="req") as bar:
        result = client.run(trace, progress=bar.update)
    summary = summarize(result.records, result.duration, goodput_slos(args), context_of(args),
                        result.info.get("scheduler_stats"))
    out = {"args": vars(args), "summary": summary, "info": result.info,
           "records": [r.to_dict() for r in result.records] if args.records else None}
    write_json(args.out, out)
    print(json.dumps(out["summary"], indent=1))
    print_goodput(summary)


def goodput_slos(args) -> dict | None:
    from loadgen.metrics import parse_goodput
    try:
        return parse_goodput(args.goodput) or None
    except ValueError as e:
        sys.exit(str(e))


def print_goodput(summary: dict, label: str = "") -> None:
    """The lines vLLM's bench serve prints for --goodput, and rejected-for-length apart."""
    g = summary.get("goodput")
    if g:
        print(f"{label}Request goodput (req/s): {g['request_goodput_rps']:.2f}  SLOs (ms): "
              + " ".join(f"{k}:{v:g}" for k, v in g["slos_ms"].items()) + "  attainment: "
              + " ".join(f"{k} {v:.3f}" for k, v in g["attainment"].items()))
    o = summary.get("over_context")
    if o and o["requests"]:
        print(f"{label}over the {o['context']}-token context: {o['requests']} requests, "
              f"{o['rejected_for_length']} rejected for length; attainment within the context "
              f"{o['attainment_within_context']:.3f}")


def rate_grid(args) -> list[float]:
    if args.rates:
        return sorted(float(x) for x in args.rates.split(","))
    step = (args.rate_max - args.rate_min) / max(1, args.num_rates - 1)
    return [round(args.rate_min + i * step, 6) for i in range(args.num_rates)]


def cmd_sweep(args) -> None:
    from loadgen.experiment import bisect_policy, report, run_grid, write_plots
    t0 = time.time()
    specs = [p for p in args.policies.split(",") if p]
    clients = {parse_policy(p)[0]: make_client(args, p) for p in specs}
    policies = list(clients)
    if args.sim:  # fit the cost model once, before the workers fork
        from aptray.sim.measured import get_gpu
        from aptray.sim.measured import hardware_for_gpu
        hardware_for_gpu(get_gpu(args.gpu), args.step_overhead)
    trace = base_trace(args)
    t_workload = time.time() - t0
    rates = rate_grid(args)
    # runs against one server must not overlap: they would load it together
    workers = 1 if getattr(args, "url", None) or getattr(args, "grpc", None) else args.workers
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    by_seed = {seed: run_grid(clients, trace, rates, args.cv, seed, workers, goodput_slos=goodput_slos(args),
                              context=context_of(args)) for seed in seeds}
    runs = by_seed[seeds[0]]
    results = report(runs, args.threshold)
    if len(seeds) > 1:  # the same requests with each seed's arrivals: effective throughput per seed, its spread
        for p in policies:
            per_seed = [report(by_seed[s], args.threshold)[p]["effective_throughput_rps"] for s in seeds]
            results[p]["effective_per_seed"] = dict(zip(map(str, seeds), per_seed))
            results[p]["effective_mean_sd"] = [float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))]
    if args.bisect:
        for p in policies:
            results[p]["bisection"] = bisect_policy(clients[p], trace, rates[0], rates[-1], args.cv, args.seed,
                                                    args.threshold, args.bisect_tol)
    os.makedirs(args.out_dir, exist_ok=True)
    title = (f"{args.model} {args.gpu if args.sim else 'cpu'} tp{args.tp}{f' pp{args.pp}' if args.pp > 1 else ''} "
             f"{args.trace or args.dataset}")
    cdf_rate = args.cdf_rate if args.cdf_rate in rates else rates[len(rates) // 2]
    plots = write_plots(runs, args.out_dir, args.threshold, cdf_rate, args.ttft_slo, args.tbt_slo, title)
    elapsed = time.time() - t0
    out = {"args": vars(args), "rates": rates, "threshold": args.threshold, "policies": results, "plots": plots,
           "timing_s": {"workload": t_workload, "total": elapsed}}
    write_json(os.path.join(args.out_dir, "results.json"), out)
    for p in policies:
        print(f"{p:8s} effective throughput {results[p]['effective_throughput_rps']:.3f} req/s  "
              f"attainment {[round(r['attainment'], 3) for r in results[p]['runs']]}")
        if "effective_mean_sd" in results[p]:
            mean, sd = results[p]["effective_mean_sd"]
            print(f"{p:8s} over seeds {seeds}: {mean:.3f} +- {sd:.3f} req/s")
        for r in results[p]["runs"]:
            print_goodput(r, f"{p:8s} {r['rate']:g} req/s  ")
    print(f"{len(runs)} runs in {elapsed:.1f} s -> {args.out_dir}")


def cmd_calibrate(args) -> None:
    from loadgen.calibrate import main as calibrate
    calibrate(args)


def cmd_results(args) -> None:
    from loadgen.make_results import main as make_results  # imported when asked: no other command needs it
    make_results(args.mode, args.parts.split(","), args.workers)


COMMANDS = {"tokenizer": cmd_tokenizer, "trace": cmd_trace, "run": cmd_run, "calibrate": cmd_calibrate,
            "sweep": cmd_sweep, "results": cmd_results}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ConnectionError as e:  # --url / --grpc with no server there: say so, no traceback
        sys.exit(f"loadgen: {e}")
