"""The results page's GPU section, rendered from the committed output of `python -m loadgen.gpu_check`
(docs/results/gpu/gpu_check.json): the real-clock replay on the device beside the simulator's replay of
the same requests, and every target of the check. Nothing runs here: a GPU run is one device call."""
from __future__ import annotations

import json
import os

from loadgen.gpu_check.report import replay_table, table

MARKS = {True: "met", False: "NOT met", None: "not measured"}


def gpu_section(path: str) -> list[str]:
    """Lines of the section, or none where no GPU check was committed."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        d = json.load(f)
    env, replay = d.get("environment", {}), d["stages"].get("replay", {})
    lines = ["## Real GPU engine, wall clock (gpu_check)", "",
             f"`{d['command']}` on {env.get('device')} ({d['started']}; torch {env.get('torch')}, triton "
             f"{env.get('triton')}), the files in docs/results/gpu/ (docs/GPU_CHECK.md says what each stage runs). "
             "The replay: OPT-13B-shaped random weights in bf16 on the one GPU, aptray's engine in-process on the wall "
             "clock, ShareGPT lengths with Gamma arrivals (CV 1), DistServe's OPT-13B chat SLOs; the simulator, priced "
             "by the step-cost profile the same run measured, replays the same requests cut at the same time. apt is "
             "the hybrid cache with absorbed attention. What the runs show, and what they leave open: "
             "docs/GPU_CHECK.md, \"First run\".", ""]
    if replay.get("runs"):
        lines += replay_table(replay) + [""]
    lines += table(["target", "measured", "result"],
                   [[t["target"], t.get("value"), MARKS[t.get("met")]] for t in d.get("targets", {}).values()])
    return lines + [""]
