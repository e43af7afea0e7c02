"""python -m loadgen.gpu_check --out DIR [--cpu-smoke] [--budget-s 480] [--stages a,b] [--rates r1,r2]
    [--policies p1,p2] [--profile P]

Five stages in order, each given its share of the wall-clock time left (time a stage does not use
goes to the next), each skipping the cases that no longer fit: kernels (Triton vs torch references),
exactness (engine vs transformers generate), bandwidth (decode attention at OPT-13B shapes), step_costs
(the engine's steps, fitted into a simulator profile DIR/<gpu>.json) and replay (real-clock replay vs
the simulator priced by that profile). DIR/gpu_check.json and DIR/gpu_check.md are rewritten after every
stage. A stage's exception is recorded in the report, never raised: the run always ends with exit code 0
and a report. --cpu-smoke runs the same stages at toy sizes on the CPU (Triton's interpreter), in seconds.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field

STAGES = ("kernels", "exactness", "bandwidth", "step_costs", "replay")
# relative shares of the budget; the replay runs on the wall clock, so it gets the most
WEIGHTS = {"kernels": 1.0, "exactness": 1.0, "bandwidth": 0.7, "step_costs": 1.2, "replay": 3.5}
RESERVE_S = 3.0  # kept back from the stages for the final report
MIN_STAGE_S = 1.0  # a stage whose share is shorter is skipped without starting


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the step-cost profile")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU, Triton kernels interpreted")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock seconds for the whole run, imports included")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--rates", help="replay: request rates (req/s) instead of the simulated knees")
    p.add_argument("--policies", help="replay: comma-separated policies (default fcfs,sarathi,apt,apt-kv; apt-kv "
                                      "is apt on the KV cache alone)")
    p.add_argument("--profile", help="replay: a step-cost profile to price the simulator with when step_costs "
                                     "does not run (a DIR/<gpu>.json of an earlier run)")
    args = p.parse_args(argv)
    bad = set(args.stages.split(",")) - set(STAGES)
    if bad:
        p.error(f"unknown stages {sorted(bad)}; known: {', '.join(STAGES)}")
    return args


@dataclass
class Context:
    """What every stage gets: its sizes, the device, where to write, and state later stages reuse
    (step_costs leaves the model runner and its profile for the replay)."""
    args: argparse.Namespace
    sizes: object
    device: str
    out_dir: str
    work_dir: str
    start: float
    checkpoint: object = None  # rewrites the report (long stages call it between runs)
    state: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        """To stdout and to DIR/gpu_check.log (a device call returns only the end of stdout)."""
        line = f"[{time.monotonic() - self.start:6.1f}s] {msg}"
        print(line, flush=True)
        with open(os.path.join(self.out_dir, "gpu_check.log"), "a") as f:
            f.write(line + "\n")


def _environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.cuda.is_available(), "device": "cpu"}
    if env["cuda"]:
        env.update(device=torch.cuda.get_device_name(), cuda_version=torch.version.cuda,
                   device_count=torch.cuda.device_count())
    for name in ("triton", "transformers", "numpy", "scipy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is reported, the stage that needs it fails
            env[name] = f"unavailable: {exc}"
    return env


def stage_fn(name: str):
    """The stage's run(ctx, pace, result), imported only when the stage starts (an import error is its error)."""
    return importlib.import_module(f"loadgen.gpu_check.{name}").run


def run_stage(name: str, fn, ctx: Context, pace, budget, report) -> None:
    """fn(ctx, pace, result) (or the name of a stage) fills result as it goes; whatever it raises ends only
    this stage."""
    from loadgen.gpu_check.budget import DeadlineExceeded
    st = report.stages[name] = {"status": "running"}
    t0 = time.monotonic()
    ctx.log(f"stage {name}: {pace.left():.0f} s")
    budget.in_stage = True
    try:
        if isinstance(fn, str):
            fn = stage_fn(fn)
        fn(ctx, pace, st)
        st["status"] = "partial" if pace.skipped else "done"
    except DeadlineExceeded as exc:
        st.update(status="deadline", error=str(exc))
    except Exception:  # noqa: BLE001 - recorded, never raised past main
        st.update(status="error", error=traceback.format_exc()[-4000:])
    finally:
        budget.in_stage = False
        st.update(seconds=round(time.monotonic() - t0, 1), skipped_cases=pace.skipped)
        _free_memory(ctx.device)
    ctx.log(f"stage {name}: {st['status']} in {st['seconds']} s" + (f"\n{st['error']}" if st.get("error") else ""))


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a CUDA fault of the stage resurfaces here; the stage recorded it
            pass


def main(argv=None, start: float | None = None) -> int:
    start = time.monotonic() if start is None else start
    args = parse_args(argv)
    # no network here, and the device call returns only the end of stdout: no hub lookups, no progress bars
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    if args.cpu_smoke:  # before torch and triton are imported: no GPU, kernels in the interpreter
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    from loadgen.gpu_check.budget import Budget
    from loadgen.gpu_check.report import Report

    budget = Budget(args.budget_s, start)
    report = Report(args.out, {"command": "python -m loadgen.gpu_check " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                               "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "budget_s": args.budget_s,
                               "started": datetime.datetime.now().isoformat(timespec="seconds")})
    try:
        run_stages(args, budget, report, start)
    except BaseException:  # noqa: BLE001 - even a fault of this loop (or ^C) leaves a report saying so
        report.data["error"] = traceback.format_exc()[-4000:]
        print(report.data["error"], flush=True)
    finally:
        budget.disarm_watchdog()
        report.write(budget.elapsed(), finished=True)
    _print_summary(report.data, args.out)
    return 0


def run_stages(args, budget, report, start: float) -> None:
    from loadgen.gpu_check.sizes import GPU, SMOKE

    selected = [s for s in STAGES if s in args.stages.split(",")]
    try:
        report.data["environment"] = _environment()
        device = "cuda" if report.data["environment"]["cuda"] else "cpu"
        blocker = None if device == "cuda" or args.cpu_smoke else "no CUDA device here (--cpu-smoke runs on the CPU)"
    except Exception:  # noqa: BLE001 - e.g. torch missing: nothing can run, but the report says why
        device, blocker = "cpu", "environment: " + traceback.format_exc()[-2000:]
    ctx = Context(args, SMOKE if args.cpu_smoke else GPU, device, args.out, os.path.join(args.out, "work"), start)
    ctx.checkpoint = lambda: report.write(budget.elapsed())
    if args.profile:
        ctx.state.update(profile=args.profile, gpu_key=_profile_gpu(args.profile))
    if args.cpu_smoke and blocker is None:
        import torch
        torch.set_num_threads(1)  # a small shared machine: one thread keeps step times steady
    budget.arm_watchdog(reserve_s=RESERVE_S / 2)
    for name in STAGES:
        if name not in selected:
            report.stages[name] = {"status": "not selected"}
            continue
        if blocker:
            report.stages[name] = {"status": "skipped", "error": blocker}
            continue
        weights_left = sum(WEIGHTS[s] for s in selected[selected.index(name):])
        pace = budget.stage(WEIGHTS[name], weights_left, RESERVE_S)
        if pace.left() < MIN_STAGE_S:
            report.stages[name] = {"status": "skipped", "error": f"no time left ({budget.left():.1f} s of the budget)"}
        else:
            run_stage(name, name, ctx, pace, budget, report)
        report.write(budget.elapsed())


def _profile_gpu(path: str) -> str:
    """The --gpu name a profile was measured on (its file name where it does not record one)."""
    import json
    with open(path) as f:
        meta = json.load(f).get("meta", {})
    return meta.get("device", {}).get("key") or os.path.splitext(os.path.basename(path))[0]


def _print_summary(d: dict, out_dir: str) -> None:
    print(f"\n{d['mode']} on {d.get('environment', {}).get('device')}: {d['elapsed_s']} s of {d['budget_s']} s")
    for name, st in d["stages"].items():
        print(f"  {name:11s} {st.get('status'):13s} {st.get('seconds', '')}")
    marks = {True: "met", False: "NOT met", None: "-"}
    for name, t in d["targets"].items():
        print(f"  {marks[t.get('met')]:8s} {name}: {t.get('value')}")
    print(f"wrote {os.path.join(os.path.abspath(out_dir), 'gpu_check.json')} and gpu_check.md")
