"""The argument parser of python -m loadgen: its subcommands and their options. Each subcommand
leaves its name in args.command, which loadgen.cli runs; the results parts parse the same options
to set up their runs."""
from __future__ import annotations

import argparse
import os

from loadgen.datasets import DATASETS
from loadgen.run_setup import DEFAULT_TOKENIZER, POLICY_DEFAULTS

DESCRIPTION = """python -m loadgen {tokenizer,trace,run,calibrate,sweep,results}: make workloads, replay them, sweep rates,
plot, regenerate docs/RESULTS.md."""


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train the default GPT-2-sized BPE tokenizer on ShareGPT text")
    t.add_argument("--out", default=DEFAULT_TOKENIZER, help="folder to write the tokenizer to")
    t.add_argument("--vocab-size", type=int, default=50265, help="BPE vocabulary size (OPT: 50265)")
    t.add_argument("--conversations", type=int, default=4000, help="ShareGPT conversations to train on")

    tr = sub.add_parser("trace", help="sample a dataset with Gamma arrivals and write a trace file")
    add_workload_args(tr)
    tr.add_argument("--model", default="opt-13b", help="model whose context caps lengths (sim name or folder)")
    tr.add_argument("--sim", action="store_true", default=True, help=argparse.SUPPRESS)
    tr.add_argument("--rate", type=float, default=1.0, help="requests per second")
    tr.add_argument("--keep-prompts", action="store_true", help="store prompt texts in the trace (JSONL)")
    tr.add_argument("--out", required=True, help="trace file: .jsonl or .csv")

    r = sub.add_parser("run", help="replay one trace at one rate against one policy; JSON summary")
    add_workload_args(r)
    add_server_args(r)
    r.add_argument("--policy", default="fcfs", help="fcfs, sarathi, apt or vllm")
    r.add_argument("--rate", type=float, default=None,
                   help="requests per second (default 1; with --trace: replace its arrivals by Gamma ones at this rate)")
    r.add_argument("--records", action="store_true", help="include every request's record in the JSON")
    r.add_argument("--out", default="results/run.json", help="JSON output path")

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
    res.set_defaults(mode="quick")
    return p
