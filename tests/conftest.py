"""Session-wide test setup: one scratch model cache for the whole run, removed when it ends.

APTRAY_CACHE is where the demo and tiny models are built (aptray/model/demo.py, aptray/smollm2.py).
Set before any test module starts Ray, so every worker inherits it and finds the models built once;
a fresh directory, so no test reads a model a user's earlier version left in ~/.cache/aptray. So is
RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, which Serve's gRPC proxy reads when it starts.

Hypothesis draws the same examples on every run (derandomize), so a failure in CI fails again on a
developer's machine; HYPOTHESIS_PROFILE=explore draws new ones each run.

xgrammar loads here, keeping the process's handlers of fatal signals (aptray.fatal_signals): a test
module's own `import xgrammar` would otherwise put its runtime's SIGSEGV handler, which can hang, in
place of pytest's faulthandler for the rest of the run.
"""
import os

from hypothesis import settings

from aptray import fatal_signals
from aptray.serve.grpc_registration import GRPC_MAX_MESSAGE_BYTES, MAX_MESSAGE_ENV
from loadgen.scratch import scratch_dir

os.environ["APTRAY_CACHE"] = scratch_dir("aptray-test-cache-")
# Serve's gRPC message limit, as aptray's configs set it: read by the Ray processes a test starts
os.environ.setdefault(MAX_MESSAGE_ENV, str(GRPC_MAX_MESSAGE_BYTES))
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
with fatal_signals.kept():
    import xgrammar  # noqa: F401
