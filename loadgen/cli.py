"""python -m loadgen {tokenizer,trace,run,calibrate,sweep,results}: make workloads, replay them, sweep rates,
plot, regenerate docs/RESULTS.md."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from loadgen.datasets import DATASETS

DEFAULT_TOKENIZER = os.path.expanduser("~/.cache/aptray/tokenizers/sharegpt-bpe-50k")
TRACE_CACHE = os.path.expanduser("~/.cache/aptray/samples")  # dataset samples by (dataset, tokenizer, n, context, seed)
# Engine settings each policy is compared with unless --engine-arg overrides them.
POLICY_DEFAULTS = {
    "fcfs": {},
    "sarathi": {"enable_chunked_prefill": True},  # its token budget is learned online for the TBT SLO
    "apt": {"cache_mode": "auto"},  # the hybrid cache where it pays (r < 1), else KV
}


# -- shared options ------------------------------------------------------------------------------
def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", help="take requests from this trace file (.jsonl or .csv) instead of sampling a "
                                   "dataset (sweep: its lengths, with Gamma arrivals at each rate)")
    g.add_argument("--dataset", choices=DATASETS, default="sharegpt",
                   help="sharegpt (ShareGPT V3), humaneval, synthetic-longprompt (a synthetic stand-in for "
                        "LongBench summarisation), sharegpt-multiturn (ShareGPT conversations turn by turn, each "
                        "resending the conversation, closed loop) or sharegpt-multiturn-system (the same on a "
                        "shared system prompt of an eighth of the context)")
    g.add_argument("--think-time", type=float, default=None,
                   help="multi-turn datasets: mean seconds (exponential) between a turn's end and the next turn "
                        "(default 5)")
    g.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="HF tokenizer folder that measures lengths (default: a GPT-2-sized BPE trained on ShareGPT, "
                        "made on first use)")
    g.add_argument("--num-requests", type=int, default=None,
                   help="requests per run (default 2,000 from a dataset; with --trace its first N by arrival, default all)")
    g.add_argument("--length-filter", choices=("none", "vllm"), default="none",
                   help="--trace: drop rows by vLLM's benchmark rule (prompt or output under 4 tokens, prompt over half "
                        "the context, both over the context) before --num-requests; datasets are always sampled so")
    g.add_argument("--context", type=int, default=None,
                   help="model context: prompt + output are capped to it (default: the model's, 2048 for OPT)")
    g.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of Gamma inter-arrivals (1 = Poisson)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling and arrivals")
    g.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT SLO in seconds for requests that set none")
    g.add_argument("--tbt-slo", type=float, default=1.0, help="TBT SLO in seconds (P99 of a request's gaps)")
    g.add_argument("--goodput", nargs="+", metavar="KIND:MS", default=None,
                   help="also report goodput as vLLM's bench serve does, for these SLOs in ms: ttft, tbt (P99 of a "
                        "request's gaps), tpot, e2el, e.g. --goodput ttft:250 tbt:100")


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--sim", action="store_true", help="simulate (cost-model executor, virtual time) instead of "
                                                       "running the real engine in this process")
    g.add_argument("--model", default="opt-13b",
                   help="--sim: opt-13b, opt-30b, opt-66b or a folder with an HF config.json; "
                        "real: a model folder (weights + tokenizer)")
    g.add_argument("--gpu", default="a100-40gb",
                   help="--sim: a100-40gb, a100-80gb, h100-80gb, h200, or a device measured by loadgen.gpu_check; "
                        "a measured profile (aptray/sim/data/measured/GPU.json) prices steps where one exists")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (1, 2, 4)")
    g.add_argument("--pp", type=int, default=1, help="--sim: pipeline-parallel stages of --tp ranks each (GPUs = tp x pp); "
                                                     "one micro-batch in flight per stage")
    g.add_argument("--step-overhead", type=float, default=1e-3,
                   help="--sim: host seconds per step outside the kernels and the scheduler's decision")
    g.add_argument("--decision-time", choices=("profile", "none"), default="profile",
                   help="--sim: charge each step the decision time of the policy that made it, from the measured "
                        "profile (aptray/sim/data/decision_time.json); none: only --step-overhead, the same for all")
    g.add_argument("--decision-scale", type=float, default=1.0,
                   help="--sim: decision times x this (a host CPU slower > 1 or faster < 1 than the profile's)")
    g.add_argument("--calibration", help="--sim: price steps with this CPU calibration JSON (python -m loadgen "
                                         "calibrate) instead of the GPU's profile fit")
    g.add_argument("--replicas", type=int, default=1,
                   help="--sim: replicas of the engine behind one router (aptray.sim.cluster)")
    g.add_argument("--routing", choices=("p2c", "slo"), default="slo",
                   help="--sim with --replicas > 1: p2c (Serve's default: two random replicas, the shorter queue) "
                        "or slo (aptray's router: the most TTFT headroom from each replica's load)")
    g.add_argument("--stats-period", type=float, default=0.1,
                   help="--sim --routing slo: seconds between the replicas' load snapshots the router sees")
    g.add_argument("--stats-lag", type=float, default=0.05,
                   help="--sim --routing slo: seconds a snapshot takes to reach the router")
    g.add_argument("--shed-unmeetable", action="store_true",
                   help="--sim: a replica refuses a request whose predicted TTFT misses its SLO (as the server's "
                        "shed_unmeetable)")
    g.add_argument("--full-drain", action="store_true",
                   help="--sim: simulate every request to the end; by default a run stops once every request "
                        "left is a certain SLO miss (attainment stays exact; latency percentiles then cover what ran)")
    g.add_argument("--url", help="replay against a running server's OpenAI-compatible HTTP API (streamed "
                                 "completions), e.g. http://127.0.0.1:8000; the policy is the server's")
    g.add_argument("--grpc", help="replay against a running server's gRPC API (streamed Generate), e.g. "
                                  "127.0.0.1:9000; the policy is the server's")
    g.add_argument("--api-key", default=os.environ.get("APTRAY_API_KEY"),
                   help="--url/--grpc: API key (Bearer), default $APTRAY_API_KEY")
    g.add_argument("--metrics-url", help="--grpc: the server's HTTP /metrics, read before and after a run for its "
                                         "prefix-cache hits (--url reads URL/metrics)")
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="EngineConfig field for every policy, e.g. max_num_seqs=128 (repeatable); "
                        f"policy defaults: {POLICY_DEFAULTS}; --sim also takes sharded_hidden=true (the hidden "
                        "cache sharded along d at TP >= 2, docs/ARCHITECTURE.md section 2)")


def parse_engine_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def model_dir(name: str, sim: bool) -> str:
    if sim and not os.path.isdir(name):
        from aptray.sim import configs_dir
        path = os.path.join(configs_dir(), name.lower())
        if not os.path.isdir(path):
            sys.exit(f"unknown simulated model {name!r}: give opt-13b, opt-30b, opt-66b or a folder with config.json")
        return path
    return name


def parse_policy(spec: str) -> tuple[str, str, dict]:
    """'fcfs' or 'label=policy:key=value:key=value' (a variant, e.g. apt-kv=apt:cache_mode=kv)."""
    label, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else (spec, "", spec)
    policy, *settings = rest.split(":")
    return label, policy, parse_engine_args(settings)


def config_factory(args, spec: str):
    from aptray.config import EngineConfig

    _, policy, variant = parse_policy(spec)
    kwargs = {**POLICY_DEFAULTS.get(policy, {}), **parse_engine_args(args.engine_arg), **variant}
    model = model_dir(args.model, args.sim)
    # sim-only: the sharded hidden cache at TP >= 2 (aptray.sim.runner.shard_hidden), not an EngineConfig field
    sharded = bool(kwargs.pop("sharded_hidden", False))
    if sharded and not args.sim:
        sys.exit("sharded_hidden is simulated only: the serving engine does not run it")
    pp = getattr(args, "pp", 1)

    wanted = kwargs.get("cache_mode", "hybrid")
    if sharded:  # replicated, the hidden cache cannot pay at TP >= 2: built as KV, then sharded
        kwargs["cache_mode"] = "auto"

    def make():
        config = EngineConfig(model=model, scheduler=policy, tensor_parallel_size=args.tp, pipeline_parallel_size=pp,
                              ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo, **kwargs)
        if sharded:
            from aptray.sim.runner import shard_hidden
            shard_hidden(config, "hybrid" if wanted == "auto" else wanted)
        return config
    return make


def make_client(args, policy: str):
    from loadgen.clients import GrpcStreamClient, HttpStreamClient, InProcessEngineClient, SimClient

    if getattr(args, "pp", 1) != 1 and not args.sim:
        sys.exit("--pp is simulated only: the serving engine runs one pipeline stage")
    if getattr(args, "url", None) or getattr(args, "grpc", None):
        if args.sim:
            sys.exit("--sim replays on the simulator; --url/--grpc on a running server: pick one")
        if args.grpc:
            return GrpcStreamClient(args.grpc, args.ttft_slo, args.tbt_slo, api_key=args.api_key,
                                    metrics_url=args.metrics_url)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        return HttpStreamClient(args.url, args.ttft_slo, args.tbt_slo, headers=headers)
    factory = config_factory(args, policy)
    if args.sim:
        scale = None if args.decision_time == "none" else args.decision_scale
        return SimClient(factory, args.gpu, args.step_overhead, args.ttft_slo, args.tbt_slo,
                         stop_when_decided=not args.full_drain, calibration=args.calibration, decision_scale=scale,
                         replicas=args.replicas, routing=args.routing, shed_unmeetable=args.shed_unmeetable,
                         stats_period_s=args.stats_period, stats_lag_s=args.stats_lag)

    def engine_factory():
        from aptray.engine import Engine
        from aptray.executor.local import LocalExecutor
        config = factory()
        return Engine(config, LocalExecutor(config))
    return InProcessEngineClient(engine_factory, None, args.ttft_slo, args.tbt_slo, args.seed)


def context_of(args) -> int:
    if args.context:
        return args.context
    from aptray.config import ModelSpec
    name = getattr(args, "model", "opt-13b")
    # a remote server's model may be no folder here: then a simulator config of that name caps lengths
    sim = getattr(args, "sim", True) or not os.path.isdir(name)
    return ModelSpec.from_path(model_dir(name, sim)).max_model_len


def get_tokenizer(path: str):
    from loadgen.datasets import load_tokenizer

    if path == DEFAULT_TOKENIZER and not os.path.isdir(path):
        from loadgen.tokenizer import sharegpt_texts, train_bpe_tokenizer
        print(f"training the default tokenizer into {path} (once, ~15 s)", file=sys.stderr)
        train_bpe_tokenizer(path, list(sharegpt_texts(4000)))
    return load_tokenizer(path)


DEFAULT_DATASET_REQUESTS = 2000


def base_trace(args, rate: float = 1.0):
    """The run's requests: a given trace file (its first --num-requests, after --length-filter), or a
    dataset sample (cached on disk: tokenising is slow)."""
    import hashlib

    from loadgen.datasets import LENGTH_RULE, Sample, load_samples
    from loadgen.traces import make_trace, read_trace, write_trace

    if args.trace:
        return trace_sample(args, read_trace(args.trace))
    context = context_of(args)
    num = args.num_requests or DEFAULT_DATASET_REQUESTS
    key = f"{args.dataset}|{os.path.abspath(args.tokenizer)}|{num}|{context}|{args.seed}|{LENGTH_RULE}"
    cache = os.path.join(TRACE_CACHE, hashlib.sha1(key.encode()).hexdigest()[:16] + ".jsonl")
    if os.path.isfile(cache):
        # in sample order, as make_trace numbered them (read_trace sorts by arrival: follow-ups interleave)
        cached = sorted(read_trace(cache), key=lambda r: int(r.request_id.removeprefix("req-")))
        samples = [Sample(r.prompt or "", r.num_prefill_tokens, r.num_decode_tokens, r.conversation,
                          shared_prefix=r.shared_prefix) for r in cached]
    else:
        samples = load_samples(args.dataset, get_tokenizer(args.tokenizer), num, context, args.seed)
        os.makedirs(TRACE_CACHE, exist_ok=True)
        write_trace(cache, make_trace(samples, 1.0, 1.0, 0, keep_prompts=True))
    return make_trace(samples, rate, args.cv, args.seed, keep_prompts=getattr(args, "keep_prompts", False),
                      think_time=getattr(args, "think_time", None))


def trace_sample(args, rows):
    """A trace's rows as the run takes them, and a line on stderr saying what was taken: vLLM's length
    filter if asked, then the first --num-requests by arrival; rows over the context are counted (the
    server refuses or cuts them; summaries report them apart)."""
    from loadgen.datasets import fits_context

    context = context_of(args)
    kept = [r for r in rows if fits_context(r.num_prefill_tokens, r.num_decode_tokens, context)] \
        if getattr(args, "length_filter", "none") == "vllm" else rows
    taken = kept[:args.num_requests] if args.num_requests else kept
    over = sum(r.num_prefill_tokens + r.num_decode_tokens > context for r in taken)
    print(f"trace {args.trace}: {len(taken)} of {len(rows)} rows"
          + (f" ({len(rows) - len(kept)} dropped by vLLM's length filter)" if len(kept) < len(rows) else "")
          + (f"; {over} over the {context}-token context (misses, reported apart)" if over else ""), file=sys.stderr)
    return taken


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if not callable(v)}


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
    out = {"args": _jsonable(vars(args)), "summary": summary, "info": result.info,
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
        from aptray.sim.gpus import get_gpu
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
    out = {"args": _jsonable(vars(args)), "rates": rates, "threshold": args.threshold, "policies": results, "plots": plots,
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train the default GPT-2-sized BPE tokenizer on ShareGPT text")
    t.add_argument("--out", default=DEFAULT_TOKENIZER, help="folder to write the tokenizer to")
    t.add_argument("--vocab-size", type=int, default=50265, help="BPE vocabulary size (OPT: 50265)")
    t.add_argument("--conversations", type=int, default=4000, help="ShareGPT conversations to train on")
    t.set_defaults(func=cmd_tokenizer)

    tr = sub.add_parser("trace", help="sample a dataset with Gamma arrivals and write a trace file")
    add_workload_args(tr)
    tr.add_argument("--model", default="opt-13b", help="model whose context caps lengths (sim name or folder)")
    tr.add_argument("--sim", action="store_true", default=True, help=argparse.SUPPRESS)
    tr.add_argument("--rate", type=float, default=1.0, help="requests per second")
    tr.add_argument("--keep-prompts", action="store_true", help="store prompt texts in the trace (JSONL)")
    tr.add_argument("--out", required=True, help="trace file: .jsonl or .csv")
    tr.set_defaults(func=cmd_trace)

    r = sub.add_parser("run", help="replay one trace at one rate against one policy; JSON summary")
    add_workload_args(r)
    add_server_args(r)
    r.add_argument("--policy", default="fcfs", help="fcfs, sarathi, apt or vllm")
    r.add_argument("--rate", type=float, default=None,
                   help="requests per second (default 1; with --trace: replace its arrivals by Gamma ones at this rate)")
    r.add_argument("--records", action="store_true", help="include every request's record in the JSON")
    r.add_argument("--out", default="results/run.json", help="JSON output path")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("calibrate", help="fit the cost model to the real CPU engine (small random OPT) and compare "
                                         "sim vs real TTFT/TBT percentiles on one trace")
    c.add_argument("--out-dir", help="folder for the model, cpu_calibration.json and validation.json")
    c.add_argument("--num-requests", type=int, default=200, help="requests in the validation trace")
    c.add_argument("--rate", type=float, default=4.0, help="their Poisson arrival rate (req/s)")
    c.add_argument("--seed", type=int, default=0, help="seed of the validation trace")
    c.add_argument("--ttft-slo", type=float, default=0.5, help="TTFT SLO (s), scaled to CPU step times")
    c.add_argument("--tbt-slo", type=float, default=0.1, help="TBT SLO (s), scaled to CPU step times")
    c.add_argument("--threads", type=int, default=1, help="torch threads")
    c.add_argument("--rounds", type=int, default=3,
                   help="rounds of (calibration waves, CPU-clock replay), interleaved so both see the same machine")
    c.add_argument("--no-wall-clock", action="store_true",
                   help="skip the wall-clock replay of the real engine (the CPU-clock replay is the comparison; "
                        "the wall-clock one shows what a shared machine adds)")
    c.set_defaults(func=lambda a: __import__("loadgen.calibrate", fromlist=["main"]).main(a))

    s = sub.add_parser("sweep", help="SLO attainment over request rates per policy; effective throughput; plots")
    add_workload_args(s)
    add_server_args(s)
    s.add_argument("--policies", default="fcfs", help="comma-separated: fcfs,sarathi,apt,vllm; a variant is "
                   "LABEL=POLICY:KEY=VALUE:..., e.g. apt-mixed=apt:iteration_shape=mixed")
    s.add_argument("--rates", help="comma-separated rates (req/s); overrides --rate-min/--rate-max/--num-rates")
    s.add_argument("--rate-min", type=float, default=0.5, help="lowest rate of the grid")
    s.add_argument("--rate-max", type=float, default=5.0, help="highest rate of the grid")
    s.add_argument("--num-rates", type=int, default=10, help="rates in the grid")
    s.add_argument("--threshold", type=float, default=0.9, help="attainment that effective throughput must keep")
    s.add_argument("--seeds", help="comma-separated arrival seeds: the grid runs once per seed (the same requests), "
                                   "and effective throughput is reported per seed with its mean +- sd; the first "
                                   "seed's runs make the plots")
    s.add_argument("--bisect", action="store_true", help="also bisect each policy's effective throughput")
    s.add_argument("--bisect-tol", type=float, default=0.02, help="relative width at which bisection stops")
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs in parallel processes")
    s.add_argument("--cdf-rate", type=float, default=None, help="rate whose TTFT/TBT CDFs are plotted (a grid rate)")
    s.add_argument("--out-dir", default="results/sweep", help="folder for results.json and the PNGs")
    s.set_defaults(func=cmd_sweep)
    res = sub.add_parser("results", help="regenerate docs/RESULTS.md: real server (wall clock), real CPU engine, "
                                         "simulated paper setups, simulated pipeline parallelism")
    mode = res.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="~40 min for server, ~15 min for cpu + sim, ~60 min for pp on the shared 2-core machine "
                           "(default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="server with more seeds, requests and rates; ~45 min for cpu + sim; pp with 500 requests "
                           "per run")
    res.add_argument("--parts", default="server,cpu,sim,pp,chat-cpu,chat-sim",
                     help="any of server (wall clock through HTTP), cpu, sim (paper setups), pp (pipeline vs tensor "
                          "parallelism), chat-cpu, chat-sim (multi-turn, with and without prefix caching); a part left out is read from its JSON")
    res.add_argument("--workers", type=int, default=2, help="processes for the simulated part")
    res.set_defaults(mode="quick", func=lambda a: __import__("loadgen.make_results", fromlist=["main"]).main(
        a.mode, a.parts.split(","), a.workers))
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConnectionError as e:  # --url / --grpc with no server there: say so, no traceback
        sys.exit(f"loadgen: {e}")
