"""docs/ARCHITECTURE.md's account of the files a request crosses against a trace of one (on a real
served app, every process profiled: loadgen/trace_request_path.py), so the table cannot drift from
the code."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the section says beside its table: the CPU's kernel files, the way back, and the files that run
# only in Serve's proxy (its request router)
CPU_KERNELS = {"kernels/aptray_kernels/cpu.py", "kernels/aptray_kernels/cpu_mirror.py"}
WAY_BACK = {"aptray/model/sampler.py", "aptray/serve/sse.py", "aptray/slo.py", "aptray/serve/grpc_refusal_logs.py"}
PROXY_ONLY = {"aptray/serve/slo_router.py", "aptray/serve/route_hints.py", "aptray/serve/routing_policy.py",
              "aptray/serve/routing_counts.py"}
GPU_KERNELS = 3  # the table's last rows: the Triton files, read from the code


def table_files() -> list[str]:
    """The section's table, in order: each row's file as a path from the repository root."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text[text.index("**The files a request crosses.**"):text.index("**Against a target")]
    rows = re.findall(r"^\| (\d+) \| `([^`]+)` \|", section, flags=re.M)
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))
    return [f if f.startswith(("aptray/", "kernels/")) else "aptray/" + f for _, f in rows]


def test_the_documented_request_path_is_the_traced_one(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run([sys.executable, "-m", "loadgen.trace_request_path", "--requests", "2", "--out",
                          str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    trace = json.loads((tmp_path / "request_path_trace.json").read_text())
    assert all(w["chunks"] == 16 for w in trace["windows"]), trace["windows"]
    documented = table_files()[:-GPU_KERNELS]
    assert not set(documented) & (CPU_KERNELS | WAY_BACK | PROXY_ONLY)
    traced, expected = set(trace["files"]), set(documented) | CPU_KERNELS | WAY_BACK | PROXY_ONLY
    assert traced == expected, {"run, not documented": sorted(traced - expected),
                                "documented, not run": sorted(expected - traced)}
