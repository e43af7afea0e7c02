"""Multi-turn chat for docs/RESULTS.md: every policy with and without prefix caching, on the real CPU
engine and in the simulator (OPT-13B on A100-40GB), on ShareGPT conversations replayed turn by turn
(loadgen.conversations) and on the same with a shared system prompt.

Both parts replay the same requests for every policy at each rate; a conversation's next turn comes a
think time (exponential) after the previous one ends, so the load follows the server (closed loop per
conversation) and the rate counts requests (conversations start at rate / mean turns).
"""
from __future__ import annotations

from loadgen import results_cpu, results_sim
from loadgen.conversations import MULTITURN, MULTITURN_SYSTEM
from loadgen.sweep import at_least, bounded_ratio, kept_at_every_rate, ratio

DATASETS = (MULTITURN, MULTITURN_SYSTEM)
BASE_POLICIES = ("fcfs", "sarathi", "vllm", "apt-kv", "apt-hybrid")
PREFIX = "+prefix"  # a policy's label with prefix caching on; without it, off


def with_and_without(policies: dict) -> dict:
    """label -> (policy, overrides): each policy without prefix caching, then with it."""
    return {label + suffix: (policy, {**extra, "enable_prefix_caching": on})
            for label, (policy, extra) in policies.items() for suffix, on in (("", False), (PREFIX, True))}


def off_beside_on(labels) -> list[list[str]]:
    """Lockstep groups (results_cpu.replay_in_lockstep): each policy without prefix caching beside
    itself with it, so that the ratio of the two compares replays that the machine's drifting speed
    slowed alike; a label without its twin alone."""
    both = pairs(labels)
    return [[p, p + PREFIX] for p in both] + [[label] for label in labels
                                              if label.removesuffix(PREFIX) not in both]


# -- the real CPU engine ----------------------------------------------------------------------------
# the tiny OPT of results_cpu at OPT's 2,048-token context, the simulated part's: conversations there
# average 2.5 turns (1.9 at 1,024), prompts 352 tokens (522 with the 256-token system prompt); 768
# blocks of 16 (12,288 tokens of KV, 6 contexts): the simulated part's pool, OPT-13B's KV beside its
# weights on an A100-40GB. A pool of 1.5 contexts evicts conversations during their think time, and
# caching then gains little (docs/ENGINE.md, "How much the pool decides it")
CPU_CONTEXT = 2048
CPU_BLOCKS = 768
THINK_STEPS = 250  # mean think time: 5 s over OPT-13B's ~20 ms decode step on an A100, in this machine's steps
CPU_RATES = {  # at results_cpu.REFERENCE_DECODE_STEP_S, scaled to this machine's decode step
    # from where every policy kept 90% at 768 blocks to where most did not (2026-12-06)
    "quick": {MULTITURN: [0.375, 0.5, 0.75, 1, 1.25, 1.5, 2, 3], MULTITURN_SYSTEM: [0.375, 0.5, 0.75, 1, 1.25, 1.5, 2, 3]},
    # the same grid with twice the requests: about twice the time
    "full": {MULTITURN: [0.375, 0.5, 0.75, 1, 1.25, 1.5, 2, 3], MULTITURN_SYSTEM: [0.375, 0.5, 0.75, 1, 1.25, 1.5, 2, 3]}}
CPU_REQUESTS = {"quick": 60, "full": 120}
CPU_SETUP = results_cpu.CpuSetup(
    context=CPU_CONTEXT, num_blocks=CPU_BLOCKS,
    policies=with_and_without({k: results_cpu.POLICIES[k] for k in BASE_POLICIES}),
    rates=CPU_RATES, requests=CPU_REQUESTS, slo_scale={d: results_cpu.SLO_SCALE["sharegpt"] for d in DATASETS}, think_steps=THINK_STEPS,
    lockstep=off_beside_on,
    description=(
        f"Tiny random OPT (d 128, 4 layers, {results_cpu.HEADS} heads, r = 1/2) at a {CPU_CONTEXT}-token context, "
        f"{CPU_BLOCKS} blocks of {results_cpu.BLOCK_SIZE} tokens ({CPU_BLOCKS * results_cpu.BLOCK_SIZE} tokens of KV), "
        "one torch thread, the serving thread's CPU time as the clock, SLOs and rates scaled to this machine as in "
        f"the CPU part above (TTFT = 1 full-context prefill, TBT = 5 16-request decode steps); think time "
        f"{THINK_STEPS} decode steps (5 s over OPT-13B's ~20 ms step); apt in the alternating shape; each policy "
        "without prefix caching replayed in lockstep with itself with it (one thread, each engine's clock running "
        "only while it works, the one furthest behind next)."))


def run_cpu(mode: str = "quick", workers: int = 2, log=print) -> dict:
    return results_cpu.run(list(DATASETS), [1.0], mode=mode, workers=workers, log=log, setup=CPU_SETUP)


# -- the simulator ----------------------------------------------------------------------------------
SIM_POLICIES = with_and_without({k: results_sim.POLICIES[k] for k in BASE_POLICIES})
SIM_SETUPS = [  # OPT-13B on A100-40GB (about 12k tokens of KV beside the weights), DistServe's chat SLOs
    results_sim.Setup("opt13b-multiturn", "opt-13b", 1, MULTITURN, 0.25, 0.1, 2.0, "DistServe OPT-13B chat"),
    results_sim.Setup("opt13b-multiturn-system", "opt-13b", 1, MULTITURN_SYSTEM, 0.25, 0.1, 2.0,
                      "DistServe OPT-13B chat"),
]
SIM_REQUESTS = {"quick": 300, "full": 600}


def run_sim(mode: str = "quick", workers: int = 2, rel_tol: float = 0.05) -> list[dict]:
    """Effective throughput by bisection (results_sim.run_policy) of every policy with and without
    prefix caching on each setup."""
    import multiprocessing as mp

    from aptray.sim.fit import hardware_for
    from aptray.sim.measured import get_gpu
    from loadgen.run_setup import base_trace
    hardware_for(get_gpu("a100-40gb"))  # fit once before forking
    n = SIM_REQUESTS[mode]
    for setup in SIM_SETUPS:
        base_trace(results_sim.sweep_args(setup, n, 1.0))  # sample each dataset once, before forking
    jobs = [(setup, label, n, 1.0, rel_tol, SIM_POLICIES) for setup in SIM_SETUPS for label in SIM_POLICIES]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            return list(pool.imap(results_sim.run_policy, jobs))
    return [results_sim.run_policy(j) for j in jobs]


# -- tables -----------------------------------------------------------------------------------------
def pairs(labels) -> list[str]:
    """Base policy labels that ran both without and with prefix caching, in order."""
    ran = set(labels)
    return [p for p in dict.fromkeys(label.removesuffix(PREFIX) for label in labels) if p in ran and p + PREFIX in ran]


def kept_rate(curve: dict) -> float:
    """The highest rate where a curve (rate -> attainment) keeps 90% (its lowest rate if none does):
    where a policy without caching and with it are compared."""
    return max([x for x in curve if curve[x] >= 0.9], default=min(curve))


def token_hit_rate(run: dict) -> float:
    """A run's prefix-cache token hit rate (0 for a run without prefix caching)."""
    return (run.get("prefix_cache") or {}).get("hit_rate_tokens", 0.0)


def _engine_cpu_s(run: dict) -> float:
    """The CPU time of the run's engine (0: not recorded). A run replayed alone in its process has its
    process's; runs in lockstep share theirs, so only their own engine_cpu_s says."""
    alone = len(run.get("lockstep", [run["policy"]])) == 1
    return run.get("engine_cpu_s", run.get("cpu_s", 0.0) if alone else 0.0)


def _ms(x) -> str:
    return f"{1e3 * x:.0f}" if x == x else "-"  # NaN: no request got a token


def cpu_tables(cpu: dict, plot_dir: str) -> list[str]:
    """Per dataset: effective throughput without and with prefix caching, TTFT p50 of both at the
    highest rate where the policy without it still keeps 90%, the token hit rate there and the
    engine's CPU time with it over without (the work caching saved); then attainment and TTFT p50
    per rate, and the shares meeting each SLO per rate."""
    import os

    from loadgen.plots import plot_attainment
    from loadgen.sweep import crossing_rate
    runs, lines = cpu["runs"], []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == dataset]
        rates = sorted({r["rate"] for r in mine})
        by = {(r["policy"], r["rate"]): r for r in mine}
        curves = {}
        for r in mine:
            curves.setdefault(r["policy"], {})[r["rate"]] = r["attainment"]
        plot_attainment(curves, os.path.join(plot_dir, f"chat-cpu-{dataset}.png"), 0.9,
                        f"real CPU engine, tiny OPT, {dataset}")
        lines += [f"{dataset} (TTFT SLO {1e3 * mine[0]['ttft_slo']:.1f} ms, TBT SLO {1e3 * mine[0]['tbt_slo']:.1f} ms): "
                  f"![](results/chat-cpu-{dataset}.png)", "",
                  "| policy | effective throughput, off (req/s) | on (req/s) | on / off | at rate | TTFT p50 off (ms) "
                  "| TTFT p50 on (ms) | on / off | token hit rate (on) | engine CPU time on / off |", "|" + " --- |" * 10]
        spans = {"throughput": [], "TTFT p50": [], "engine CPU time": []}  # on / off per policy
        bounds = []  # labels whose effective throughput is only a lower bound
        for p in pairs(dict.fromkeys(r["policy"] for r in mine)):
            off, on = crossing_rate(curves[p]), crossing_rate(curves[p + PREFIX])
            off_top, on_top = kept_at_every_rate(curves[p]), kept_at_every_rate(curves[p + PREFIX])
            at = kept_rate(curves[p])
            t_off, t_on = by[(p, at)]["ttft_s"]["p50"], by[(p + PREFIX, at)]["ttft_s"]["p50"]
            hits = token_hit_rate(by[(p + PREFIX, at)])
            cpu_off, cpu_on = _engine_cpu_s(by[(p, at)]), _engine_cpu_s(by[(p + PREFIX, at)])
            lines.append(f"| {p} | {at_least(off, off_top)} | {at_least(on, on_top)} "
                         f"| {bounded_ratio(on, off, on_top, off_top)} | {at:.3g} | {_ms(t_off)} | {_ms(t_on)} "
                         f"| {ratio(t_on, t_off)} | {hits:.0%} | {ratio(cpu_on, cpu_off)} |")
            bounds += [p + PREFIX] * on_top + [p] * off_top
            for key, (a, b) in zip(spans, ((on, off), (t_on, t_off), (cpu_on, cpu_off))):
                if a and b and not (key == "throughput" and (on_top or off_top)):
                    spans[key].append(a / b)
        lines += ["", "With prefix caching over without, across policies: " + "; ".join(
            f"{key} {min(v):.2f}-{max(v):.2f}x" for key, v in spans.items() if v)
            + (f" (the throughput span leaves out {', '.join(bounds)}, which kept 90% at every rate tried: "
               "its effective throughput is at least the highest rate tried, marked `>=`)" if bounds else "") + "."]
        lines += ["", "SLO attainment, and TTFT p50 in ms, per rate (req/s):", "",
                  "| policy | " + " | ".join(f"{x:.3g}" for x in rates) + " | preemptions (all rates) |",
                  "|" + " --- |" * (len(rates) + 2)]
        for p in curves:
            cells = [f"{by[(p, x)]['attainment']:.2f} / {_ms(by[(p, x)]['ttft_s']['p50'])}" for x in rates]
            lines.append(f"| {p} | " + " | ".join(cells) + f" | {sum(by[(p, x)]['preemptions'] for x in rates)} |")
        if all("attainment_by_slo" in r for r in mine):  # what the misses miss
            lines += ["", "Share of requests meeting their TTFT SLO / their TBT SLO, per rate (req/s):", "",
                      "| policy | " + " | ".join(f"{x:.3g}" for x in rates) + " |", "|" + " --- |" * (len(rates) + 1)]
            for p in curves:
                cells = [f"{by[(p, x)]['attainment_by_slo']['ttft']:.2f} / {by[(p, x)]['attainment_by_slo']['tbt']:.2f}"
                         for x in rates]
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def sim_tables(sim: list[dict], plot_dir: str) -> list[str]:
    """Per setup and policy: effective throughput without and with prefix caching; apt-hybrid over
    apt-kv, both with it; TTFT p50 and the token hit rate at the probe nearest each effective
    throughput."""
    import os

    from loadgen.plots import plot_attainment
    by = {(r["setup"], r["policy"]): r for r in sim}
    lines = ["| setup | policy | effective throughput, off (req/s) | on (req/s) | on / off | TTFT p50 off / on (ms) "
             "| token hit rate (on) |", "|" + " --- |" * 7]
    for setup in dict.fromkeys(r["setup"] for r in sim):
        labels = [p for (s, p) in by if s == setup]
        for p in pairs(labels):
            off, on = by[(setup, p)], by[(setup, p + PREFIX)]
            eff_off, eff_on = off["effective_throughput_rps"], on["effective_throughput_rps"]
            near_off, near_on = _nearest(off, eff_off), _nearest(on, eff_on)
            hits = token_hit_rate(near_on)
            lines.append(f"| {setup} | {p} | {eff_off:.2f} | {eff_on:.2f} | {ratio(eff_on, eff_off)} | "
                         f"{_ms(near_off['ttft_s']['p50'])} / {_ms(near_on['ttft_s']['p50'])} | {hits:.0%} |")
        curves = {p: {float(k): v["attainment"] for k, v in by[(setup, p)]["probes"].items()} for p in labels}
        plot_attainment(curves, os.path.join(plot_dir, f"chat-sim-{setup}.png"), 0.9, f"sim OPT-13B A100-40GB {setup}")
    lines += ["", "apt with hybrid prefix caching over apt with KV-only prefix caching (effective throughput): "
              + "; ".join(f"{s}: {ratio(by[(s, 'apt-hybrid' + PREFIX)]['effective_throughput_rps'], by[(s, 'apt-kv' + PREFIX)]['effective_throughput_rps'])}"
                          for s in dict.fromkeys(r["setup"] for r in sim)
                          if (s, "apt-hybrid" + PREFIX) in by and (s, "apt-kv" + PREFIX) in by) + ".",
              "", "Attainment curves (bisection probes): "
              + " ".join(f"[{s}](results/chat-sim-{s}.png)" for s in dict.fromkeys(r["setup"] for r in sim)), ""]
    return lines


def _nearest(result: dict, rate: float) -> dict:
    """The probe at the highest rate not above `rate` (the lowest probe when none is)."""
    probes = {float(k): v for k, v in result["probes"].items()}
    below = [r for r in probes if r <= rate]
    return probes[max(below) if below else min(probes)]
