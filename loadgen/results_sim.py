"""Simulated paper setups for docs/RESULTS.md: effective throughput of each policy by bisection.

Each setup is a model on A100-40GB at its TP degree, a dataset and SLOs (docs/ARCHITECTURE.md section 4); every
policy replays the same sampled requests with Gamma arrivals (same seed) at the rates the bisection
probes, on the real Engine and schedulers with the simulator's cost model (virtual time).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import dataclass

from loadgen.metrics import summarize
from loadgen.sweep import effective_throughput
from loadgen.traces import rescale

# label -> (policy, EngineConfig overrides); loadgen.run_setup's POLICY_DEFAULTS apply underneath
POLICIES = {
    "fcfs": ("fcfs", {}),
    "sarathi": ("sarathi", {}),
    "vllm": ("vllm", {}),  # vLLM V1's default scheduler (docs/SCHEDULER.md)
    "apt-kv": ("apt", {"cache_mode": "kv"}),
    # "auto": the hybrid cache where it pays; at TP >= 2 (r >= 1) the same run as apt-kv (the tables mark =KV)
    "apt-hybrid": ("apt", {"cache_mode": "auto", "hidden_attention": "absorbed"}),
    "apt-hybrid-recompute": ("apt", {"cache_mode": "auto", "hidden_attention": "recompute"}),
    # the hidden cache sharded along d at TP >= 2 (docs/ARCHITECTURE.md section 2; simulated only:
    # aptray.sim.runner.shard_hidden)
    "apt-hybrid-sharded": ("apt", {"cache_mode": "hybrid", "hidden_attention": "absorbed", "sharded_hidden": True}),
}
# the baselines with the hybrid cache too (KV first, hidden when KV does not fit): the pipeline comparison
VARIANTS = {**POLICIES, "fcfs-hybrid": ("fcfs", {"cache_mode": "auto"}),
            "sarathi-hybrid": ("sarathi", {"cache_mode": "auto"})}
TP2_ONLY = {"apt-hybrid-sharded": "apt-hybrid"}  # at TP 1 nothing is sharded: the same run as this one
PAPER_BEST = 8.8  # Apt-Serve's "up to 8.8x" effective throughput over vLLM


@dataclass(frozen=True)
class Setup:
    name: str
    model: str
    tp: int
    dataset: str
    ttft_slo: float
    tbt_slo: float
    start_rate: float  # where the bisection starts looking (it doubles / halves from there)
    slo_note: str
    gpu: str = "a100-40gb"
    pp: int = 1  # pipeline stages of tp ranks each


SETUPS = [
    Setup("opt13b-sharegpt", "opt-13b", 1, "sharegpt", 0.25, 0.1, 2.0, "DistServe OPT-13B chat"),
    Setup("opt13b-humaneval", "opt-13b", 1, "humaneval", 0.125, 0.2, 4.0, "DistServe OPT-66B code (no 13B code SLO given)"),
    Setup("opt13b-longprompt", "opt-13b", 1, "synthetic-longprompt", 15.0, 0.15, 0.5,
          "DistServe OPT-66B summarisation (no 13B one given)"),
    Setup("opt30b-sharegpt", "opt-30b", 2, "sharegpt", 0.4, 0.1, 1.0, "OPT-66B chat's (no 30B SLO given)"),
    Setup("opt30b-humaneval", "opt-30b", 2, "humaneval", 0.125, 0.2, 2.0, "DistServe OPT-66B code"),
    Setup("opt30b-longprompt", "opt-30b", 2, "synthetic-longprompt", 15.0, 0.15, 0.5,
          "DistServe OPT-66B summarisation (no 30B one given)"),
    Setup("opt66b-sharegpt", "opt-66b", 4, "sharegpt", 0.4, 0.1, 1.0, "DistServe OPT-66B chat"),
    Setup("opt66b-humaneval", "opt-66b", 4, "humaneval", 0.125, 0.2, 2.0, "DistServe OPT-66B code"),
    Setup("opt66b-longprompt", "opt-66b", 4, "synthetic-longprompt", 15.0, 0.15, 0.25, "DistServe OPT-66B summarisation"),
]


def sweep_args(setup: Setup, num_requests: int, cv: float):
    from loadgen.arguments import build_parser
    return build_parser().parse_args([
        "sweep", "--sim", "--model", setup.model, "--gpu", setup.gpu, "--tp", str(setup.tp), "--pp", str(setup.pp),
        "--dataset", setup.dataset,
        "--num-requests", str(num_requests), "--ttft-slo", str(setup.ttft_slo), "--tbt-slo", str(setup.tbt_slo),
        "--cv", str(cv)])


def _spec(label: str, policies: dict) -> str:
    policy, extra = policies[label]
    # values as parse_engine_args reads them back: JSON for non-strings (False, not the string "False")
    return f"{label}={policy}" + "".join(f":{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in extra.items())


def run_policy(job) -> dict:
    """Bisection of one policy's effective throughput on one setup (a worker process). job: (setup,
    label, num_requests, cv, rel_tol[, policies: label -> (policy, overrides), default VARIANTS])."""
    from loadgen.run_setup import base_trace, make_client
    setup, label, num_requests, cv, rel_tol, *rest = job
    args = sweep_args(setup, num_requests, cv)
    trace = base_trace(args)
    client = make_client(args, _spec(label, rest[0] if rest else VARIANTS))
    probes: dict[float, dict] = {}
    t0 = time.process_time()

    def attainment_at(rate: float) -> float:
        res = client.run(rescale(trace, rate, cv, args.seed))
        stats = res.info.get("scheduler_stats", {})
        s = summarize(res.records, res.duration, stats=stats)
        steps = res.info.get("steps") or 1
        probes[rate] = {"attainment": s["attainment"], "goodput_rps": s["goodput_rps"], "ttft_s": s["ttft_s"],
                        "preemptions": s["preemptions"], "stats": stats,
                        "num_blocks": res.info.get("num_blocks"), "tbt_p50_s": s["tbt_s"].get("p50"),
                        "tbt_p99_s": s["tbt_s"].get("p99"), "ttft_p90_s": s["ttft_s"].get("p90"),
                        "step_s": res.info.get("busy_time_s", 0.0) / steps,
                        **({"prefix_cache": s["prefix_cache"]} if "prefix_cache" in s else {})}
        if "pipeline" in res.info:
            probes[rate]["pipeline"] = res.info["pipeline"]
        return s["attainment"]

    found = effective_throughput(attainment_at, setup.start_rate / 2, setup.start_rate, 0.9, rel_tol)
    hidden_on = client.config_factory().cache_mode != "kv"
    return {"setup": setup.name, "policy": label, "effective_throughput_rps": found.rate,
            "hidden_enabled": hidden_on, "probes": {str(r): probes[r] for r in sorted(probes)},
            "cpu_s": time.process_time() - t0}


def run_all(setups: list[Setup], policies: list[str], num_requests: int, cv: float, rel_tol: float,
            workers: int) -> list[dict]:
    from aptray.sim.fit import hardware_for
    from aptray.sim.measured import get_gpu
    from loadgen.run_setup import base_trace
    for gpu in {s.gpu for s in setups}:
        hardware_for(get_gpu(gpu))  # fit once before forking
    for s in setups:
        base_trace(sweep_args(s, num_requests, cv))  # sample (and cache) each dataset once, before forking
    jobs = [(s, p, num_requests, cv, rel_tol) for s in setups for p in policies
            if not (s.tp < 2 and p in TP2_ONLY and TP2_ONLY[p] in policies)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            out = list(pool.imap(run_policy, jobs))
    else:
        out = [run_policy(j) for j in jobs]
    by = {(r["setup"], r["policy"]): r for r in out}
    for s in setups:  # a row for every (setup, policy): TP-2-only variants copy their TP 1 twin
        for p in policies:
            if (s.name, p) not in by and p in TP2_ONLY:
                twin = by[(s.name, TP2_ONLY[p])]
                out.append({**twin, "policy": p, "same_as": TP2_ONLY[p], "cpu_s": 0.0})
    order = {(s.name, p): i for i, (s, p) in enumerate((s, p) for s in setups for p in policies)}
    return sorted(out, key=lambda r: order[(r["setup"], r["policy"])])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else ("inf" if a > 0 else "-")


def markdown_table(results: list[dict]) -> list[str]:
    """Effective throughput per setup and policy, and apt's ratios over fcfs, sarathi and vllm beside the
    paper's best (up to 8.8x over vLLM 0.5, i.e. over fcfs here)."""
    by = {(r["setup"], r["policy"]): r for r in results}
    policies = list(dict.fromkeys(r["policy"] for r in results))
    apts = [p for p in policies if p.startswith("apt")]
    head = ["setup", "TP", "SLO TTFT / TBT (s)", *policies, *(f"{a}/fcfs" for a in apts),
            *(f"{a}/sarathi" for a in apts), *(f"{a}/vllm" for a in apts), "best apt/fcfs (paper: up to 8.8x)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in SETUPS:
        if (s.name, "fcfs") not in by:
            continue
        eff = {p: by[(s.name, p)]["effective_throughput_rps"] for p in policies if (s.name, p) in by}

        def cell(p):
            r = by.get((s.name, p))
            if r is None:
                return "-"
            note = " (=KV)" if "hybrid" in p and not r.get("hidden_enabled", True) else ""
            note = note or (f" (={r['same_as']})" if r.get("same_as") else "")
            return f"{eff[p]:.2f}{note}"
        best = max((eff[a] for a in apts if a in eff), default=0.0)
        lines.append("| " + " | ".join([s.name, str(s.tp), f"{s.ttft_slo:g} / {s.tbt_slo:g}", *map(cell, policies),
                                         *(_ratio(eff.get(a, 0), eff.get("fcfs", 0)) for a in apts),
                                         *(_ratio(eff.get(a, 0), eff.get("sarathi", 0)) for a in apts),
                                         *(_ratio(eff.get(a, 0), eff.get("vllm", 0)) for a in apts),
                                         f"{_ratio(best, eff.get('fcfs', 0))} vs {PAPER_BEST}x"]) + " |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default=",".join(s.name for s in SETUPS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="write the results (JSON) here")
    a = ap.parse_args(argv)
    chosen = [s for s in SETUPS if s.name in a.setups.split(",")]
    t0 = time.time()
    results = run_all(chosen, a.policies.split(","), a.num_requests, 1.0, 0.05, a.workers)
    for r in results:
        print(f"{r['setup']:20s} {r['policy']:22s} {r['effective_throughput_rps']:.3f} req/s  ({r['cpu_s']:.0f} s)")
    print("\n".join(markdown_table(results)))
    print(f"{time.time() - t0:.0f} s")
    if a.out:
        import json
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
