"""Runs of one trace at many rates and policies, in worker processes; the sweep's JSON and plots."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
from tqdm import tqdm

from loadgen.clients import Client
from loadgen.metrics import summarize
from loadgen.sweep import crossing_rate, effective_throughput
from loadgen.traces import TraceRequest, rescale

_JOB: dict = {}  # set before forking: workers read the clients and the trace from here

MAX_GAPS_KEPT = 20_000  # TBT samples per run kept for the CDFs


def run_one(policy: str, rate: float) -> dict:
    """One policy at one rate: the trace's requests with fresh Gamma arrivals at that rate."""
    client: Client = _JOB["clients"][policy]
    trace = rescale(_JOB["trace"], rate, _JOB["cv"], _JOB["seed"])
    result = client.run(trace)
    summary = summarize(result.records, result.duration, _JOB.get("goodput_slos"), _JOB.get("context"),
                        result.info.get("scheduler_stats"))
    gaps = np.array([g for r in result.records for g in r.token_gaps])
    if gaps.size > MAX_GAPS_KEPT:
        gaps = np.random.default_rng(0).choice(gaps, MAX_GAPS_KEPT, replace=False)
    return {"policy": policy, "rate": rate, "summary": summary, "info": result.info,
            "ttfts": [r.ttft for r in result.records if r.ttft is not None], "gaps": gaps.tolist()}


def _star(args):
    return run_one(*args)


def run_grid(clients: dict[str, Client], trace: list[TraceRequest], rates: list[float], cv: float, seed: int,
             workers: int = 1, progress: bool = True, goodput_slos: dict | None = None,
             context: int | None = None) -> list[dict]:
    """Every policy at every rate. goodput_slos, context: as loadgen.metrics.summarize takes them."""
    _JOB.update(clients=clients, trace=trace, cv=cv, seed=seed, goodput_slos=goodput_slos, context=context)
    # lowest rates first: they take the most engine steps, so the workers finish together
    jobs = sorted(((p, r) for p in clients for r in rates), key=lambda j: (j[1], j[0] != "apt"))
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress)
    out = []
    if workers > 1 and "fork" in mp.get_all_start_methods():
        with mp.get_context("fork").Pool(workers) as pool:
            for res in pool.imap_unordered(_star, jobs):
                out.append(res)
                bar.update(1)
    else:
        for job in jobs:
            out.append(run_one(*job))
            bar.update(1)
    bar.close()
    return sorted(out, key=lambda r: (list(clients).index(r["policy"]), r["rate"]))


def bisect_policy(client: Client, trace: list[TraceRequest], lo: float, hi: float, cv: float, seed: int,
                  threshold: float, rel_tol: float) -> dict:
    _JOB.update(clients={"_": client}, trace=trace, cv=cv, seed=seed)
    found = effective_throughput(lambda rate: run_one("_", rate)["summary"]["attainment"], lo, hi, threshold, rel_tol)
    return {"effective_throughput_rps": found.rate, "probes": {str(k): v for k, v in sorted(found.evaluated.items())}}


def curves_of(runs: list[dict]) -> dict[str, dict[float, float]]:
    curves: dict[str, dict[float, float]] = {}
    for r in runs:
        curves.setdefault(r["policy"], {})[r["rate"]] = r["summary"]["attainment"]
    return curves


def report(runs: list[dict], threshold: float) -> dict:
    """JSON-ready results: per policy, the curve, goodput per rate, and effective throughput from the grid."""
    out = {}
    for policy, curve in curves_of(runs).items():
        mine = [r for r in runs if r["policy"] == policy]
        out[policy] = {
            "effective_throughput_rps": crossing_rate(curve, threshold),
            "highest_rate_meeting_threshold": max([r for r, a in curve.items() if a >= threshold], default=0.0),
            "runs": [{"rate": r["rate"], **r["summary"], "info": r["info"]} for r in mine],
        }
    return out


def write_plots(runs: list[dict], out_dir: str, threshold: float, cdf_rate: float, ttft_slo: float, tbt_slo: float,
                title: str) -> list[str]:
    from loadgen.plots import plot_attainment, plot_cdf

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("attainment.png", "ttft_cdf.png", "tbt_cdf.png")]
    plot_attainment(curves_of(runs), paths[0], threshold, title)
    at = [r for r in runs if r["rate"] == cdf_rate]
    plot_cdf({r["policy"]: r["ttfts"] for r in at}, paths[1], "TTFT (s)", ttft_slo, f"{title} @ {cdf_rate:g} req/s")
    plot_cdf({r["policy"]: r["gaps"] for r in at}, paths[2], "time between tokens (s)", tbt_slo,
             f"{title} @ {cdf_rate:g} req/s")
    return paths
