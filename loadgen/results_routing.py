"""Routing across replicas, simulated: Serve's default router against aptray's SLO-aware one.

    python -m loadgen.results_routing --replicas 4,8

N OPT-13B replicas on A100-40GB (aptray.sim.cluster: each replica the single-replica simulation,
the same scheduler in every run), ShareGPT, Gamma arrivals at CV 4, DistServe's OPT-13B chat SLOs;
every router replays the same requests at the rates the bisection probes. Writes
docs/results/routing-sim.json and renders docs/results/routing.md, the section of docs/RESULTS.md
that `python -m loadgen.bench_routing` (the real served run) fills too.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

from loadgen.metrics import summarize
from loadgen.sweep import effective_throughput
from loadgen.traces import rescale

OUT_DIR = "docs/results"
SIM_JSON, CPU_JSON, FRAGMENT = "routing-sim.json", "routing-cpu.json", "routing.md"
# label -> (routing, shed_unmeetable, extra loadgen args). slo: loads every 0.1 s (the default
# routing_stats_period_s), seen 0.05 s later
ROUTERS = {"p2c": ("p2c", False, []), "slo": ("slo", False, []), "slo+shed": ("slo", True, []),
           "slo-0.5s": ("slo", False, ["--stats-period", "0.5", "--stats-lag", "0.1"]),  # loads every 0.5 s
           # the same router with perfect information: loads as they are, at every decision
           "slo-exact": ("slo", False, ["--stats-period", "0.001", "--stats-lag", "0"])}
TTFT_SLO, TBT_SLO = 0.25, 0.1  # DistServe, OPT-13B chat
PER_REPLICA_START = 4.0  # req/s per replica where the bisection starts


def _args(replicas: int, num_requests: int, cv: float, label: str, policy: str):
    from loadgen.arguments import build_parser
    routing, shed, extra = ROUTERS[label]
    argv = ["sweep", "--sim", "--model", "opt-13b", "--gpu", "a100-40gb", "--dataset", "sharegpt",
            "--num-requests", str(num_requests), "--ttft-slo", str(TTFT_SLO), "--tbt-slo", str(TBT_SLO),
            "--cv", str(cv), "--replicas", str(replicas), "--routing", routing, "--policies", policy]
    return build_parser().parse_args(argv + (["--shed-unmeetable"] if shed else []) + extra)


def run_router(job) -> dict:
    """Bisection of one router's effective throughput at one replica count (a worker process)."""
    from loadgen.run_setup import base_trace, make_client
    replicas, label, num_requests, cv, rel_tol, policy = job
    args = _args(replicas, num_requests, cv, label, policy)
    trace, client = base_trace(args), make_client(args, policy)
    probes: dict[float, dict] = {}
    t0 = time.process_time()

    def attainment_at(rate: float) -> float:
        res = client.run(rescale(trace, rate, cv, args.seed))
        s = summarize(res.records, res.duration)
        probes[rate] = {"attainment": s["attainment"], "statuses": s["statuses"], "ttft_p90_s": s["ttft_s"]["p90"],
                        "routed": res.info.get("routed")}
        return s["attainment"]

    start = PER_REPLICA_START * replicas
    found = effective_throughput(attainment_at, start / 2, start, 0.9, rel_tol)
    return {"replicas": replicas, "router": label, "policy": policy, "effective_throughput_rps": found.rate,
            "probes": {str(r): probes[r] for r in sorted(probes)}, "cpu_s": time.process_time() - t0}


def run_all(replica_counts: list[int], labels: list[str], per_replica: int, cv: float, rel_tol: float, policy: str,
            workers: int) -> list[dict]:
    from aptray.sim.fit import hardware_for
    from aptray.sim.measured import get_gpu
    from loadgen.run_setup import base_trace
    hardware_for(get_gpu("a100-40gb"))  # fit once before forking
    for n in replica_counts:
        base_trace(_args(n, per_replica * n, cv, labels[0], policy))  # sample (and cache) before forking
    jobs = [(n, label, per_replica * n, cv, rel_tol, policy) for n in replica_counts for label in labels]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            return list(pool.imap(run_router, jobs))
    return [run_router(j) for j in jobs]


def sim_table(results: list[dict]) -> list[str]:
    labels = list(dict.fromkeys(r["router"] for r in results))
    by = {(r["replicas"], r["router"]): r["effective_throughput_rps"] for r in results}
    head = ["replicas", *(f"{label} (req/s)" for label in labels), *(f"{label}/p2c" for label in labels[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in sorted({r["replicas"] for r in results}):
        base = by.get((n, "p2c"), 0)
        cells = [f"{by[(n, label)]:.2f}" for label in labels]
        cells += [f"{by[(n, label)] / base:.2f}x" if base else "-" for label in labels[1:]]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def probe_table(results: list[dict]) -> list[str]:
    lines = ["| replicas | router | attainment at the rates probed (req/s: attainment) |", "| --- | --- | --- |"]
    for r in results:
        probes = ", ".join(f"{float(k):.3g}: {v['attainment']:.3f}" for k, v in r["probes"].items())
        lines.append(f"| {r['replicas']} | {r['router']} | {probes} |")
    return lines


def _effective(rate: float, rates: list[str]) -> str:
    """A crossing of 0 means the lowest rate tried already missed 90%: say so, not "0 req/s"."""
    return f"{rate:.2f}" if rate > 0 else f"< {min(map(float, rates)):g}"


def routers_of(cpu: dict) -> list[str]:
    """The routers a routing-cpu.json compared (runs before the third router had two)."""
    return list(cpu.get("routers", ("p2c", "slo")))


def paired_difference(ours, base, level: float = 0.95) -> tuple[float, float, float] | None:
    """Mean of ours - base over paired replays (the same chunk of requests for both routers, minutes
    apart) and its t-interval at `level`: (mean, low, high). None without two pairs."""
    from scipy import stats
    if len(ours) != len(base) or len(ours) < 2:
        return None
    diff = np.asarray(ours, float) - np.asarray(base, float)
    mean = float(diff.mean())
    half = float(stats.t.ppf((1 + level) / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff)))
    return mean, mean - half, mean + half


def _interval(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.3f} ({d[1]:+.3f} to {d[2]:+.3f})"


def _paired(by: dict, name: str):
    """Router `name` minus p2c at one rate, paired by chunk replay (None where the passes do not pair)."""
    return paired_difference(by[name].get("passes", []), by["p2c"].get("passes", []))


def paired_tables(cpu: dict) -> list[str]:
    """Each router against p2c, rate by rate: the mean difference of attainment over the chunk
    replays both made of the same requests, with its 95% interval."""
    ours = [name for name in routers_of(cpu) if name != "p2c"]
    lines, replays = [], set()
    for n, run in cpu["runs"].items():
        rates = list(run["rates"])
        rows = [(name, [_paired(run["rates"][r], name) for r in rates]) for name in ours]
        if not any(d for _, cells in rows for d in cells):
            continue
        replays |= {len(run["rates"][r]["p2c"]["passes"]) for name, cells in rows for r, d in zip(rates, cells) if d}
        lines += [f"{n} replicas, minus p2c:", "", "| router | " + " | ".join(f"{float(r):.3g}" for r in rates) + " |",
                  "|" + " --- |" * (len(rates) + 1)]
        lines += [f"| {name} | " + " | ".join(_interval(d) if d else "-" for d in cells) + " |" for name, cells in rows]
        lines.append("")
    if not lines:
        return []
    return [f"Paired by replay: each router's attainment on a chunk minus p2c's on the same requests, the mean over "
            f"the {'/'.join(map(str, sorted(replays)))} replays of each rate (the difference of the attainments "
            "above) and its 95% t-interval:", ""] + lines


def cpu_section(cpu: dict) -> list[str]:
    """The real served run's part of docs/results/routing.md."""
    s, routers = cpu["slos"], routers_of(cpu)
    equal = cpu.get("routers", {}).get("slo-eq", {}).get("routing_equal_ttft_fraction")
    order = " ".join("ABC"[:len(routers)]) + " " + " ".join("ABC"[:len(routers)][::-1])
    passes = ("each rate replays the same trace to every router at once, twice (whatever drifts over minutes falls on "
              "all alike; each router's replicas share the cores with the others'), attainment over both passes"
              if cpu.get("together") else f"each rate replays the same trace to each router twice, in the order "
              f"{order} (reversed every other rate), attainment over both passes")
    if cpu.get("chunks", 1) > 1:
        passes += (f"; each pass is cut into {cpu['chunks']} chunks of consecutive arrivals and the routers take "
                   "turns chunk by chunk (the order reversed at each chunk and at each pass, so that a chunk's second "
                   "pass runs the routers in the reverse order of its first), so that whatever drifts over minutes "
                   "falls on all alike")
    lines = [f"### Served on this machine's CPU: {', '.join(cpu['runs'])} replicas through HTTP", "",
             f"`{cpu['command']}` ({cpu['stamp']}, {cpu['elapsed_s'] / 60:.0f} min; 2 shared cores). One Ray cluster "
             f"serves {len(routers)} copies of the app, one per router ({', '.join(routers)}"
             + (f"; slo-eq: aptray's router with `routing_equal_ttft_fraction` {equal}" if "slo-eq" in routers
                else "") + f"), every replica an apt-hybrid engine on the tiny OPT of loadgen.results_cpu; {passes}. "
             f"{cpu['num_requests']} requests per pass, ShareGPT lengths within 512 tokens, Gamma arrivals at CV "
             f"{cpu['cv']:g}, half the requests tight (TTFT {1e3 * s['tight_ttft_s']:.0f} ms = {s['tight_ttft_prefills']:g} "
             f"full-context prefills + {1e3 * s['ttft_allowance_s']:.0f} ms, TBT {1e3 * s['tight_tbt_s']:.0f} ms = "
             f"{s['tight_tbt_steps']:g} decode steps + {1e3 * s['tbt_allowance_s']:.0f} ms; this machine's prefill "
             f"{1e3 * cpu['prefill_s']:.1f} ms and 16-request decode step {1e3 * cpu['decode_step_s']:.2f} ms, CPU time) "
             f"and half relaxed ({s['relaxed']:g}x both). Attainment per rate (req/s) and effective throughput "
             "(interpolated 90% crossing):", ""]
    for n, run in cpu["runs"].items():
        rates = list(run["rates"])
        lines += [f"{n} replicas:", "", "| router | " + " | ".join(f"{float(r):.3g}" for r in rates)
                  + " | effective (req/s) |", "|" + " --- |" * (len(rates) + 2)]
        for name in routers:
            cells = [f"{run['rates'][r][name]['attainment']:.3f}" for r in rates]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_effective(run['effective_throughput_rps'][name], rates)} |")
        lines.append("")
    lines += paired_tables(cpu)
    refused = [f"{n} replicas, {name} at {float(rate):.3g} req/s: " + "; ".join(f"{k} ({v})" for k, v in c[name]["errors"].items())
               for n, run in cpu["runs"].items() for rate, c in run["rates"].items() for name in routers
               if c.get(name, {}).get("errors")]
    if refused:
        lines += ["Requests the servers refused or failed (counted as misses), by message:", ""]
        lines += [f"- {r}" for r in refused] + [""]
    return lines


def _paired_note(by: dict, name: str) -> str:
    d = _paired(by, name)
    return f"; paired difference {d[0]:+.3f}, 95% interval {d[1]:+.3f} to {d[2]:+.3f}" if d else ""


def targets(sim: dict | None, cpu: dict | None) -> list[str]:
    """The two routing targets, as measured: met or missed, with the numbers."""
    lines = ["Targets, as measured:", ""]
    if sim:
        by = {(r["replicas"], r["router"]): r["effective_throughput_rps"] for r in sim["results"]}
        for n in sim["replicas"]:
            if by.get((n, "p2c")) and (n, "slo") in by:
                ratio = by[(n, "slo")] / by[(n, "p2c")]
                others = ", ".join(f"{label} {by[(n, label)] / by[(n, 'p2c')]:.2f}x" for label in ROUTERS
                                   if label not in ("p2c", "slo") and (n, label) in by)
                verdict = f" (target >= 1.3x at 8 replicas: {'met' if ratio >= 1.3 else 'missed'})" if n == 8 else ""
                lines.append(f"- simulated {n} x OPT-13B, ShareGPT, CV {sim['cv']:g}: slo / p2c = {ratio:.2f}x"
                             f"{verdict}; {others}")
    if cpu:
        ours = [name for name in routers_of(cpu) if name != "p2c"]
        for n, run in cpu["runs"].items():
            rates = run["rates"]
            for name in ours:
                worse = [r for r in rates if rates[r][name]["attainment"] < rates[r]["p2c"]["attainment"]]
                detail = "; lower at " + ", ".join(f"{float(r):g} req/s ({rates[r][name]['attainment']:.3f} against "
                                                   f"{rates[r]['p2c']['attainment']:.3f}{_paired_note(rates[r], name)})"
                                                   for r in worse) if worse else ""
                verdict = f" (target: every rate at 2 replicas: {'met' if not worse else 'missed'})" if n == "2" else ""
                lines.append(f"- served, {n} replicas: {name} attainment >= p2c at {len(rates) - len(worse)} of "
                             f"{len(rates)} rates{verdict}{detail}")
    return lines + [""]


def render(out_dir: str = OUT_DIR) -> str:
    """docs/results/routing.md from the JSONs that exist (the real run's comes from bench_routing)."""
    lines = ["## Routing across replicas", ""]
    cpu_path, sim_path = os.path.join(out_dir, CPU_JSON), os.path.join(out_dir, SIM_JSON)
    cpu = sim = None
    if os.path.exists(cpu_path):
        with open(cpu_path) as f:
            cpu = json.load(f)
    if os.path.exists(sim_path):
        with open(sim_path) as f:
            sim = json.load(f)
    lines += targets(sim, cpu)
    if cpu:
        lines += cpu_section(cpu) + [""]
    if sim:
        lines += [f"### Simulated: {', '.join(str(n) for n in sim['replicas'])} x OPT-13B (A100-40GB), ShareGPT, "
                  f"CV {sim['cv']:g}", "",
                  f"`{sim['command']}` ({sim['stamp']}, {sim['elapsed_s'] / 60:.0f} min). Each replica is the "
                  "single-replica simulation with the same scheduler "
                  f"({sim['policy']}); {sim['per_replica']} requests per replica per run, SLOs TTFT "
                  f"{TTFT_SLO:g} s / TBT {TBT_SLO:g} s (DistServe OPT-13B chat), effective throughput by bisection "
                  f"({100 * sim['rel_tol']:.0f}% tolerance). p2c: Serve's default (two random replicas, fewer "
                  "requests in flight; exact and current in the simulator); slo: aptray's router on loads "
                  "snapshotted every 0.1 s (routing_stats_period_s' default) and seen 0.05 s later, plus what it "
                  "sent since; slo+shed: and each replica refuses a request whose predicted TTFT misses its SLO; "
                  "slo-0.5s: loads every 0.5 s, seen 0.1 s later; slo-exact: loads exact at every decision.", "",
                  *sim_table(sim["results"]), "", *probe_table(sim["results"]), ""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, FRAGMENT), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="4,8")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--per-replica", type=int, default=200, help="requests per replica in each run")
    ap.add_argument("--cv", type=float, default=4.0)
    ap.add_argument("--policy", default="apt", help="the scheduler of every replica (loadgen policy spec)")
    ap.add_argument("--rel-tol", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-dir", default=OUT_DIR)
    a = ap.parse_args(argv)
    t0, stamp = time.time(), time.strftime("%Y-%m-%d %H:%M")
    counts = [int(n) for n in a.replicas.split(",")]
    results = run_all(counts, a.routers.split(","), a.per_replica, a.cv, a.rel_tol, a.policy, a.workers)
    for r in results:
        print(f"{r['replicas']} replicas {r['router']:9s} {r['effective_throughput_rps']:.2f} req/s "
              f"({r['cpu_s']:.0f} s CPU)", flush=True)
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, SIM_JSON), "w") as f:
        json.dump({"command": "python -m loadgen.results_routing " + " ".join(sys.argv[1:] if argv is None else argv),
                   "stamp": stamp, "elapsed_s": time.time() - t0, "replicas": counts, "cv": a.cv,
                   "policy": a.policy, "per_replica": a.per_replica, "rel_tol": a.rel_tol, "results": results}, f,
                  indent=1)
    print("\n".join(sim_table(results)))
    render(a.out_dir)


if __name__ == "__main__":
    main()
