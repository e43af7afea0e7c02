"""Session-wide test setup: one scratch model cache for the whole run, removed when it ends.

APTRAY_CACHE is where the demo and tiny models are built (aptray/model/demo.py, aptray/smollm2.py).
Set before any test module starts Ray, so every worker inherits it and finds the models built once;
a fresh directory, so no test reads a model a user's earlier version left in ~/.cache/aptray.
"""
import os

from loadgen.scratch import scratch_dir

os.environ["APTRAY_CACHE"] = scratch_dir("aptray-test-cache-")
