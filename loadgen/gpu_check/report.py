"""gpu_check.json (everything measured) and gpu_check.md (a short reading of it), rewritten after every
stage so that a run killed part way still leaves what it had."""
from __future__ import annotations

import json
import math
import os
from itertools import groupby


def complete(failed: list, run: list, planned: list) -> bool | None:
    """A target over every case: False once one fails, True when all ran and passed, else None (not known)."""
    if failed:
        return False
    return True if len(run) == len(planned) else None


def _clean(x):
    """Strict JSON: NaN and infinities become null, tuples lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Report:
    def __init__(self, out_dir: str, header: dict):
        self.out_dir = out_dir
        self.data = {**header, "stages": {}, "targets": {}}
        os.makedirs(out_dir, exist_ok=True)

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def write(self, elapsed_s: float, finished: bool = False) -> None:
        self.data.update(elapsed_s=round(elapsed_s, 1), finished=finished)
        self.data["targets"] = {k: v for st in self.stages.values() for k, v in st.get("targets", {}).items()}
        tmp = os.path.join(self.out_dir, ".gpu_check.json.tmp")
        with open(tmp, "w") as f:
            json.dump(_clean(self.data), f, indent=1, allow_nan=False)
        os.replace(tmp, os.path.join(self.out_dir, "gpu_check.json"))  # never a half-written file
        with open(os.path.join(self.out_dir, "gpu_check.md"), "w") as f:
            f.write(markdown(self.data))


def _fmt(v, spec=".3g"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _last_line(text) -> str | None:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else None


def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows])


def markdown(d: dict) -> str:
    env = d.get("environment", {})
    out = ["# aptray GPU check", "",
           f"`{d['command']}` ({d['mode']}) on {env.get('device', '?')}, {d['started']}: {d.get('elapsed_s')} s of a "
           f"{d['budget_s']} s budget{'' if d.get('finished') else ' (still running or killed)'}. "
           f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}.", "",
           "## Targets", ""]
    marks = {True: "met", False: "NOT met", None: "not measured"}
    out += table(["target", "measured", "result"],
                  [[t["target"], _fmt(t.get("value")), marks[t.get("met")]] for t in d["targets"].values()])
    out += ["", "## Stages", ""]
    out += table(["stage", "status", "seconds", "cases skipped", "error"],
                  [[name, st.get("status"), st.get("seconds"), st.get("skipped_cases"), _last_line(st.get("error"))]
                   for name, st in d["stages"].items()])
    for name, fn in (("kernels", _kernels), ("exactness", _exactness), ("bandwidth", _bandwidth),
                     ("step_costs", _step_costs), ("replay", replay_table)):
        st = d["stages"].get(name, {})
        if st.get("summary") or st.get("fit_error") or st.get("runs"):
            out += ["", f"## {name}", ""] + fn(st)
    return "\n".join(out) + "\n"


def _kernels(st: dict) -> list[str]:
    s = st["summary"]
    lines = [f"{s['passed']}/{s['cases']} cases within tolerance ({s['run']} run); worst ||out - ref|| / ||ref|| "
             f"by dtype: " + ", ".join(f"{k} {v:.2e}" for k, v in s["worst_rel_by_dtype"].items()) + "."]
    if s["failed"]:
        lines += ["", "Failed: " + "; ".join(s["failed"])]
    return lines


def _exactness(st: dict) -> list[str]:
    s = st["summary"]
    lines = [f"fp32: {s['fp32_cases_identical']}/{s['fp32_cases']} cases give transformers' tokens exactly. "
             f"bf16: first 16 tokens identical on {_fmt(s['bf16_first16_share'])} of prompts, all tokens on "
             f"{_fmt(s['bf16_identical_share'])} (transformers bf16 vs its own fp32: "
             f"{_fmt(s['hf_bf16_vs_hf_fp32_first16_share'])}). Preemptions {s['preemptions']}, conversions to KV "
             f"{s['conversions_to_kv']}, to hidden {s['conversions_to_hidden']} over {s['run']}/{s['cases']} cases."]
    if s["failed"]:
        lines += ["", "Failed: " + "; ".join(s["failed"])]
    return lines


def _bandwidth(st: dict) -> list[str]:
    dev = st.get("device", {})
    lines = [f"{dev.get('device')}: HBM peak {_fmt(dev.get('peak_gbps'))} GB/s, copy {_fmt(dev.get('copy_gbps'))} "
             f"GB/s, bf16 matmul {_fmt(dev.get('matmul_bf16_tflops'))} TFLOP/s; {st.get('dtype')}, block "
             f"{st.get('block_size')}.", ""]
    rows = [[r["context"], r["batch"], r["kv_ms"], r["kv_gbps"], r["kv_pct_peak"], r["absorbed_ms"],
             r["hidden_gbps"], r["absorbed_over_kv"]] for r in st.get("rows", [])]
    lines += table(["context", "batch", "KV ms", "KV GB/s", "KV % peak", "absorbed ms", "hidden GB/s",
                    "absorbed / KV"], rows)
    tilings = st.get("tilings") or []
    if tilings:
        timed = sorted((r for r in tilings if "ms" in r), key=lambda r: (r["context"], r["batch"], r["ms"]))
        lines += ["", f"Absorbed tilings against the default (block_t 32, block_d 128, Triton's warps): "
                      f"{len(timed)} of {len(tilings)} timed (the rest differed from the reference or did not "
                      "compile); the three fastest per point:", ""]
        best = [r for _, group in groupby(timed, key=lambda r: (r["context"], r["batch"])) for r in list(group)[:3]]
        lines += table(["context", "batch", "block_t", "block_d", "warps", "ms", "default ms", "/ default"],
                       [[r["context"], r["batch"], r["block_t"], r["block_d"], r["num_warps"], r["ms"], r["default_ms"],
                         r["over_default"]] for r in best])
    sampler = st.get("sampler") or []
    if sampler:
        lines += ["", "The sampler per step (loadgen/bench_sampler.py: median of 10 calls):", ""]
        lines += table(["rows", "case", "ms", "x greedy"], [[r["rows"], r["case"], r["ms"], r["x_greedy"]]
                                                             for r in sampler])
    return lines


def _step_costs(st: dict) -> list[str]:
    e = st["fit_error"]
    host = st.get("host_outside_runner") or {}
    lines = [f"{st['model']} {st['dtype']}, {st['num_blocks']} blocks of {st['block_size']}: {st['steps']} steps, "
             f"{st['shapes']} shapes; cost-model fit |pred/measured - 1| mean {e['mean']:.1%}, median "
             f"{e['median']:.1%}, p90 {e['p90']:.1%}; by kind: "
             + ", ".join(f"{k} {v['mean']:.1%}" for k, v in st["fit_error_by_kind"].items())
             + f". Engine step beyond the runner: {_fmt(host.get('per_step_s'))} s + {_fmt(host.get('per_seq_s'))} s"
             f" per sequence. Profile: {st['profile']} (--gpu {st['gpu_key']}).", ""]
    pairs: dict = {}  # the same step with KV and with hidden requests, side by side
    for r in st.get("table", []):
        key = (r["kind_of_step"].split("_")[0], r.get("prefill", 0), r.get("start", 0), r.get("batch", 0),
               r.get("context", 0), r.get("hidden", 0))
        pairs.setdefault(key, {})[r["kind"]] = r
    rows = [[*key, *(v.get(k, {}).get(f) for k in ("kv", "hidden") for f in ("ms", "predicted_ms"))]
            for key, v in pairs.items()]
    return lines + table(["step", "prefill tokens", "from position", "decodes", "context",
                          "hidden among the KV decodes", "KV ms", "fit", "hidden ms", "fit"], rows)


def replay_table(st: dict) -> list[str]:
    """The replay stage's runs: attainment real and simulated, latencies and sim / real ratios."""
    lines = [f"SLO TTFT {st['slo']['ttft_s']} s, TBT {st['slo']['tbt_s']} s; rates {st.get('rates')} "
             f"({st.get('rate_source')}, knees {st.get('sim_knees')}); pool {st.get('num_blocks')} blocks.", ""]
    rows = []
    for r in st.get("runs", []):
        real, sim, q = r["real"], r["sim"], r["sim_over_real"]
        rows.append([f"{r['rate']:g}", r["policy"], r["requests"], real["attainment"], sim["attainment"],
                     1e3 * real["ttft_s"]["p50"], q["ttft_s_p50"], q["ttft_s_p90"], 1e3 * real["tbt_s"]["p50"],
                     q["tbt_s_p50"], q["tbt_s_p90"]])
    return lines + table(["req/s", "policy", "requests", "attainment real", "sim", "TTFT p50 ms", "sim/real p50",
                           "p90", "TBT p50 ms", "sim/real p50", "p90"], rows)
