"""python -m loadgen results [--quick|--full] [--parts server,cpu,sim,pp,chat-cpu,chat-sim]: regenerate
docs/RESULTS.md, its JSON and PNGs.

Six parts: the real server on a wall clock, several seeds per rate (loadgen.results_server), the
real CPU engine on its thread's CPU time (loadgen.results_cpu), the simulated paper setups
(loadgen.results_sim), the simulated pipeline-parallel comparison (loadgen.results_pp) and
multi-turn chat with and without prefix caching on the CPU engine and simulated (loadgen.results_chat). A part
left out of --parts is re-rendered from its JSON (--parts "" re-renders all); each part's JSON holds
its result and the record of its run (when it began, its minutes and mode). --quick (the default)
runs the server part in about 40 minutes on the shared 2-core machine, the CPU and simulated ones in
about 15 and the pipeline part in about an hour; --full uses more seeds, requests and rates.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from loadgen.sweep import at_least, bounded_ratio, crossing_rate, kept_at_every_rate, ratio

OUT_DIR = "docs/results"
DOC = "docs/RESULTS.md"
SIM_REQUESTS = {"quick": 250, "full": 500}


def _pm(s: dict | None, fmt: str = ".2f", unit: str = "") -> str:
    """mean +- sd (min-max) of a spread (loadgen.results_server.spread)."""
    if not s:
        return "-"
    return (f"{s['mean']:{fmt}}{unit} +- {s['sd']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})")


def server_tables(server: dict, plot_dir: str) -> list[str]:
    """Effective throughput per policy (mean +- sd over seeds), apt's paired ratios, attainment per rate."""
    from loadgen.plots import plot_attainment_spread
    eff, ratios, n = server["effective"], server["ratios"], len(server["seeds"])
    lines = [f"| policy | effective throughput (req/s), mean +- sd (min-max) over {n} seeds | per seed |",
             "| --- | --- | --- |"]
    for p in server["policies"]:
        e = eff[p]
        bound = " (>= : met at the highest rate tried)" if e["lower_bound"] else ""
        lines.append(f"| {p} | {_pm(e)}{bound} | " + ", ".join(f"{v:.2f}" for v in e["per_seed"]) + " |")
    unmet = [p for p in server["policies"] if 0.0 in eff[p]["per_seed"]]
    if unmet:
        lines += ["", f"A 0.00 seed: {', '.join(unmet)} kept 90% at no rate tried with that seed (the lowest is "
                  f"{server['rates'][0]:.3g} req/s); their ratios are not given, and the attainment per rate below "
                  "compares them instead."]
    lines += ["", "| ratio (paired per seed: the same requests) | mean +- sd (min-max) |", "| --- | --- |"]
    for name, r in ratios.items():
        lines.append(f"| {name} | {_pm(r, unit='x')} |")
    curves: dict[str, dict[float, list[float]]] = {}
    for r in server["runs"]:
        curves.setdefault(r["policy"], {}).setdefault(r["rate"], []).append(r["attainment"])
    plot_attainment_spread(curves, os.path.join(plot_dir, "server-sharegpt.png"), 0.9,
                           f"real server, wall clock, tiny OPT, ShareGPT, CV 1 ({n} seeds)")
    rates = server["rates"]
    lines += ["", f"SLO attainment per rate, mean +- sd over seeds (TTFT SLO {1e3 * server['ttft_slo']:.1f} ms, "
              f"TBT SLO {1e3 * server['tbt_slo']:.1f} ms): ![](results/server-sharegpt.png)", "",
              "| policy | " + " | ".join(f"{x:.3g}" for x in rates) + " |", "|" + " --- |" * (len(rates) + 1)]
    for p in server["policies"]:
        cells = []
        for x in rates:
            v = curves[p].get(x, [])
            cells.append(f"{np.mean(v):.2f} +- {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}" if v else "-")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def cpu_tables(cpu: dict, plot_dir: str) -> list[str]:
    from loadgen.plots import plot_attainment
    lines, unmet, capped = [], [], False
    runs = cpu["runs"]
    groups = sorted({(r["dataset"], r["cv"]) for r in runs})
    pairs = [(a, b) for b in ("fcfs", "sarathi", "vllm") if b in _policies(runs) for a in ("apt-kv", "apt-hybrid")]
    lines.append("| dataset | CV | " + " | ".join(f"{p} (req/s)" for p in _policies(runs))
                 + " | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |")
    lines.append("|" + " --- |" * (2 + len(_policies(runs)) + len(pairs)))
    for dataset, cv in groups:
        curves = {}
        for r in runs:
            if (r["dataset"], r["cv"]) == (dataset, cv):
                curves.setdefault(r["policy"], {})[r["rate"]] = r["attainment"]
        eff = {p: crossing_rate(c, 0.9) for p, c in curves.items()}
        top = {p: kept_at_every_rate(c) for p, c in curves.items()}  # kept 90% at every rate tried: a lower bound
        cells = [at_least(eff[p], top[p], ".1f") for p in _policies(runs)]
        lines.append(f"| {dataset} | {cv:g} | " + " | ".join(cells) + " | "
                     + " | ".join(bounded_ratio(eff[a], eff[b], top[a], top[b]) for a, b in pairs)
                     + " |")
        capped |= any(top.values())
        plot_attainment(curves, os.path.join(plot_dir, f"cpu-{dataset}-cv{cv:g}.png"), 0.9,
                        f"real CPU engine, tiny OPT, {dataset}, CV {cv:g}")
        if not any(eff.values()):
            lowest = min(r for c in curves.values() for r in c)
            ttft = {r["policy"]: r["ttft_s"]["p90"] for r in runs
                    if (r["dataset"], r["cv"], r["rate"]) == (dataset, cv, lowest)}
            unmet.append((dataset, cv, curves, lowest, ttft))
    lines.append("")
    if capped:
        lines += ["`>=`: the policy kept 90% at every rate tried, so its effective throughput is at least the highest rate tried "
                  "(and a ratio with it in the numerator at least the one shown; `-` where the denominator is such a "
                  "bound).", ""]
    lines += _unmet_note(unmet, _policies(runs), cpu["num_blocks"])
    lines.append("SLO attainment per rate (same run):")
    lines.append("")
    for dataset, cv in groups:
        mine = [r for r in runs if (r["dataset"], r["cv"]) == (dataset, cv)]
        rates = sorted({r["rate"] for r in mine})
        lines.append(f"{dataset}, CV {cv:g} (TTFT SLO {1e3 * mine[0]['ttft_slo']:.1f} ms, "
                     f"TBT SLO {1e3 * mine[0]['tbt_slo']:.1f} ms): ![](results/cpu-{dataset}-cv{cv:g}.png)")
        lines.append("")
        lines.append("| policy | " + " | ".join(f"{r:.3g}" for r in rates) + " | preemptions (all rates) |")
        lines.append("|" + " --- |" * (len(rates) + 2))
        for p in _policies(runs):
            by = {r["rate"]: r for r in mine if r["policy"] == p}
            lines.append(f"| {p} | " + " | ".join(f"{by[x]['attainment']:.2f}" for x in rates)
                         + f" | {sum(by[x]['preemptions'] for x in rates)} |")
        lines.append("")
    return lines


def _unmet_note(unmet: list, policies: list[str], num_blocks: int) -> list[str]:
    """Where no policy keeps 90% at any rate tried, effective throughput says nothing: compare the
    attainment over the rates tried instead, and say why it is low."""
    if not unmet:
        return []
    parts = []
    for dataset, cv, curves, lowest, ttft in unmet:
        means = ", ".join(f"{p} {sum(curves[p].values()) / len(curves[p]):.2f}" for p in policies if p in curves)
        p90 = ", ".join(f"{p} {1e3 * ttft[p]:.0f} ms" for p in policies if p in ttft)
        parts.append(f"{dataset} CV {cv:g}: {means} (TTFT p90 at {lowest:.3g} req/s: {p90})")
    return ["Rows at 0.0: no policy keeps 90% of requests within both SLOs even at the lowest rate tried. "
            "Mean attainment over the rates tried, per policy: " + "; ".join(parts) + ". At CV 4 requests "
            f"arrive in bursts: with a TTFT SLO of one full-context prefill and {num_blocks} blocks of cache, a burst's "
            "later requests wait for memory and behind its earlier ones' prefills, whichever policy orders them.",
            ""]


def _policies(runs: list[dict]) -> list[str]:
    seen = []
    for r in runs:
        if r["policy"] not in seen:
            seen.append(r["policy"])
    return seen


def sim_tables(sim: list[dict], plot_dir: str) -> list[str]:
    from loadgen.plots import plot_attainment
    from loadgen.results_sim import SETUPS
    by = {(r["setup"], r["policy"]): r for r in sim}
    policies = list(dict.fromkeys(r["policy"] for r in sim))
    lines = ["| setup | TP | SLO TTFT / TBT (s) | " + " | ".join(policies)
             + " | apt-kv/fcfs | apt-hybrid/fcfs | apt-kv/sarathi | apt-hybrid/sarathi | apt-kv/vllm | apt-hybrid/vllm"
             + " | hybrid/recompute | best apt/fcfs (paper: up to 8.8x) | best apt/sarathi | best apt/vllm |",
             "|" + " --- |" * (3 + len(policies) + 10)]
    for s in SETUPS:
        if (s.name, "fcfs") not in by:
            continue
        eff = {p: by[(s.name, p)]["effective_throughput_rps"] for p in policies if (s.name, p) in by}
        cells = [f"{eff[p]:.2f}" + ("" if by[(s.name, p)].get("hidden_enabled", True) or "hybrid" not in p
                                    else " (=KV)") for p in policies]
        best = max((v for p, v in eff.items() if p.startswith("apt")), default=0.0)
        lines.append(f"| {s.name} | {s.tp} | {s.ttft_slo:g} / {s.tbt_slo:g} | " + " | ".join(cells) + " | "
                     + " | ".join(ratio(eff.get(a, 0), eff.get(b, 0)) for a, b in (
                         ("apt-kv", "fcfs"), ("apt-hybrid", "fcfs"), ("apt-kv", "sarathi"), ("apt-hybrid", "sarathi"),
                         ("apt-kv", "vllm"), ("apt-hybrid", "vllm"), ("apt-hybrid", "apt-hybrid-recompute"))) + " | "
                     + f"{ratio(best, eff.get('fcfs', 0))} | {ratio(best, eff.get('sarathi', 0))} | "
                     + f"{ratio(best, eff.get('vllm', 0))} |")
        curves = {p: {float(k): v["attainment"] for k, v in by[(s.name, p)]["probes"].items()} for p in eff}
        plot_attainment(curves, os.path.join(plot_dir, f"sim-{s.name}.png"), 0.9,
                        f"sim {s.model} A100-40GB x{s.tp} {s.dataset}")
    lines.append("")
    lines.append("SLO sources: " + "; ".join(f"{s.name}: {s.slo_note}" for s in SETUPS) + ".")
    lines.append("")
    lines.append("Attainment curves (bisection probes): "
                 + " ".join(f"[{s.name}](results/sim-{s.name}.png)" for s in SETUPS if (s.name, "fcfs") in by))
    return lines


def pp_section(record: dict) -> list[str]:
    from loadgen.results_pp import markdown
    pp = record["result"]
    return [
        "## Simulated pipeline parallelism: the hybrid cache per stage",
        "",
        f"Generated by `python -m loadgen results --{record['mode']} --parts pp` ({record['stamp']}; "
        f"{record['elapsed_s'] / 60:.0f} min "
        f"wall). {pp['num_requests']} requests per run, CV {pp['cv']:g}, bisection as above. Layouts: TP t (today's), "
        "PP p (p stages of L/p whole layers, one GPU each: the hidden cache is d per token per layer against 2·n_kv·D "
        "for KV, r = 1/2), TP 2 x PP 2 (r = d / (2·n_kv·D/2) = 1 within a stage: the engine turns hidden off and runs "
        "KV, marked =KV; `apt sharded` is the d-sharded hidden cache of the table above, r = 1/2, simulated beside "
        "it). A hybrid layout runs every policy with the hybrid cache (fcfs and sarathi: KV first, hidden when KV "
        "does not fit), a KV layout with KV. Pipelines run one micro-batch per stage in flight, each with its own "
        "scheduler over one shared block pool (docs/SIMULATOR.md section 10): a request gets a token per traversal "
        "of every stage. SLOs: DistServe's OPT-66B chat, code and summarisation SLOs (the main table's for "
        "OPT-30B).",
        "",
        *markdown(pp),
        "",
    ]


def chat_section(records: dict) -> list[str]:
    """The multi-turn section, from the chat parts' records (nothing for a part never run)."""
    from loadgen import results_chat
    done = {part: records[part] for part in ("chat-cpu", "chat-sim") if part in records}
    if not done:
        return []
    lines = ["## Multi-turn chat with prefix caching", "",
             "ShareGPT conversations replayed turn by turn (`--dataset sharegpt-multiturn`; `-system`: every "
             "conversation opens with one shared system prompt of an eighth of the context): each turn resends the "
             "conversation so far with the reply the server gave, a think time (exponential) after the previous turn ends. "
             "Each policy runs without prefix caching and with it (`+prefix`); the rate counts requests. Token hit rate: "
             "prompt tokens found cached at admission over all prompt tokens admitted (docs/ENGINE.md, \"Prefix "
             "caching\").", ""]
    if "chat-cpu" in done:
        d = done["chat-cpu"]
        cpu = d["result"]
        lines += ["### Real CPU engine", "",
                  f"`python -m loadgen results --{d['mode']} --parts chat-cpu` ({d['stamp']}, {d['elapsed_s'] / 60:.0f} min). "
                  f"{cpu['num_requests']} requests per run. {cpu['description']} Measured here: 16-request decode step "
                  f"{1e3 * cpu['decode_step_s']:.2f} ms, {cpu['context'] - 1}-token prefill {1e3 * cpu['prefill_s']:.1f} ms, "
                  f"think time {cpu['think_s']:.2f} s.", "", *results_chat.cpu_tables(cpu, OUT_DIR)]
    if "chat-sim" in done:
        d = done["chat-sim"]
        lines += ["### Simulated OPT-13B (A100-40GB)", "",
                  f"`python -m loadgen results --{d['mode']} --parts chat-sim` ({d['stamp']}, {d['elapsed_s'] / 60:.0f} min). "
                  f"{results_chat.SIM_REQUESTS[d['mode']]} requests per run, effective throughput by bisection (5% "
                  "tolerance), DistServe's OPT-13B chat SLOs (0.25 s / 0.1 s), think time 5 s.", "",
                  *results_chat.sim_tables(d["result"], OUT_DIR)]
    return lines


def main(mode: str = "quick", parts=("server", "cpu", "sim", "pp"), workers: int = 2) -> None:
    from loadgen import results_chat, results_cpu, results_pp, results_server, results_sim
    from loadgen.results_gpu import gpu_section
    os.makedirs(OUT_DIR, exist_ok=True)
    t0 = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    runs = {"server": lambda: results_server.run(mode, log=log),
            "cpu": lambda: results_cpu.run(["sharegpt", "humaneval"], [1.0, 4.0], mode=mode, log=log),
            "sim": lambda: results_sim.run_all(results_sim.SETUPS, list(results_sim.POLICIES), SIM_REQUESTS[mode], 1.0,
                                               0.05, workers),
            "pp": lambda: results_pp.run(num_requests=SIM_REQUESTS[mode], workers=workers, log=log),
            "chat-cpu": lambda: results_chat.run_cpu(mode, workers, log=log),
            "chat-sim": lambda: results_chat.run_sim(mode, workers)}
    for part, run in runs.items():  # server first: the longest, and the one a busy machine hurts most
        if part in parts:
            run_part(part, mode, run)
    records = {part: d for part in runs if (d := read_part(part))}  # every part that ever ran
    server, cpu, sim, pp = (records[p]["result"] if p in records else None for p in ("server", "cpu", "sim", "pp"))
    body = [
        "# Results",
        "",
        "Generated by `python -m loadgen results` (`--quick` or `--full`), which runs every part below on a 2-core "
        "machine and renders this page; `--parts` runs some and re-renders the rest from their JSONs (docs/results/). Last runs: "
        + "; ".join(f"{part} {t['stamp']} ({t['elapsed_s'] / 60:.0f} min, --{t['mode']})" for part, t in records.items())
        + ". Effective throughput = the highest request rate with >= 90% of requests meeting both SLOs "
        "(docs/ARCHITECTURE.md section 4).",
        "",
    ]
    if server:
        body += [
            "## Real server, wall clock (ShareGPT, CV 1)",
            "",
            f"`python -m loadgen results --{records['server']['mode']} --parts server` ({records['server']['stamp']}, "
            f"{records['server']['elapsed_s'] / 60:.0f} min; 1-minute load average {server.get('load_average', float('nan')):.0f} when the "
            f"runs began and {server.get('load_average_after', float('nan')):.0f} at the end, the run's own processes "
            "included, on 2 cores). "
            f"{server['num_requests']} requests per run, {len(server['seeds'])} seeds per rate. {server['description']} "
            f"Measured here: the engine's 16-request decode step {1e3 * server['decode_step_s']:.2f} ms and "
            f"{server['context'] - 1}-token prefill {1e3 * server['prefill_s']:.1f} ms (wall clock, in-process); through "
            f"the server, a full-context prompt's TTFT {1e3 * server['served_ttft_s']:.1f} ms and the median gap of 16 "
            f"requests decoding together {1e3 * server['served_gap_s']:.2f} ms. Effective throughput per seed is "
            "interpolated between grid rates (`crossing_rate`); the spread is the standard deviation over seeds.",
            "",
            *server_tables(server, OUT_DIR),
        ]
    if cpu:
        body += [
            "## Real CPU engine, thread CPU time (second method)",
            "",
            f"{cpu['num_requests']} requests per run, one seed per rate. {cpu['description']} Measured here: 16-request "
            f"decode step {1e3 * cpu['decode_step_s']:.2f} ms, {cpu['context'] - 1}-token prefill "
            f"{1e3 * cpu['prefill_s']:.1f} ms. Not what a user measures (idle gaps are skipped, other processes' time "
            "is not counted, no HTTP): it isolates the engine from the shared machine; the table above is the wall clock.",
            "",
            *cpu_tables(cpu, OUT_DIR),
        ]
    body += gpu_section(os.path.join(OUT_DIR, "gpu", "gpu_check.json"))
    if sim:
        body += [
            "## Simulated paper setups (A100-40GB)",
            "",
            f"{SIM_REQUESTS[records['sim']['mode']]} requests per run, CV 1, effective throughput by "
            "bisection (5% tolerance) on the "
            "real schedulers with the simulator's cost model (docs/SIMULATOR.md). Every step is also charged the "
            "decision time of the policy that made it (measured per policy over queue and running-set sizes: "
            "aptray/sim/data/decision_time.json), besides a 1 ms host overhead the same for all. vllm is vLLM V1's "
            "default scheduler (docs/SCHEDULER.md). apt-hybrid uses absorbed hidden "
            "attention (exact for OPT: no rotary positions), apt-hybrid-recompute the paper's recompute path. "
            "At TP >= 2 the replicated hidden vector costs as much as KV per rank "
            "(r = 1, docs/ARCHITECTURE.md section 2), so the engine turns the hidden cache off and those hybrid "
            "columns are apt-kv's (marked =KV); apt-hybrid-sharded is the hidden vector sharded along d (d/t per "
            "rank, absorbed attention with its collectives priced; simulated only: the serving engine does not use "
            "it), the same run as apt-hybrid at TP 1.",
            "",
            *sim_tables(sim, OUT_DIR),
            "",
        ]
    if pp:
        body += pp_section(records["pp"])
    body += chat_section(records)
    routing = os.path.join(OUT_DIR, "routing.md")  # made by loadgen.results_routing and loadgen.bench_routing
    if os.path.exists(routing):
        with open(routing) as f:
            body += [f.read(), ""]
    with open(DOC, "w") as f:
        f.write("\n".join(body))
    print(f"wrote {DOC} in {time.time() - t0:.0f} s")


# each part's JSON: what it measured ("result"), when the run began ("stamp"), its minutes and mode
PART_FILES = {"server": "server.json", "cpu": "cpu.json", "sim": "sim.json", "pp": "sim_pp.json",
              "chat-cpu": "chat_cpu.json", "chat-sim": "chat_sim.json"}


def run_part(part: str, mode: str, run) -> None:
    """Runs one part (run()) into its JSON, with the record of the run."""
    t0, stamp = time.time(), time.strftime("%Y-%m-%d %H:%M")
    result = run()
    _write(os.path.join(OUT_DIR, PART_FILES[part]),
           {"stamp": stamp, "mode": mode, "elapsed_s": time.time() - t0, "result": result})


def read_part(part: str) -> dict | None:
    """A part's record and result (run_part), or None where it never ran."""
    return _read(os.path.join(OUT_DIR, PART_FILES[part]))


def _write(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _read(path: str):
    """A part's JSON, or None where it was never measured."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
