"""Loading xgrammar keeps a process's handlers of fatal signals (aptray.fatal_signals): its runtime's
own SIGSEGV handler symbolizes a backtrace and can hang, where the process should die (a router, so
that Ray reports it dead and the ingress replaces it)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tiny_models import tiny_model

CRASH_AFTER_A_COMPILE = textwrap.dedent("""
    import faulthandler, os, signal, sys
    from transformers import AutoTokenizer
    from aptray.structured_output import Grammars, StructuredOutput
    faulthandler.enable()  # the handler in place before xgrammar loads
    Grammars(AutoTokenizer.from_pretrained(sys.argv[1]), 512).compile(StructuredOutput("regex", "[a-z]+"))
    os.kill(os.getpid(), signal.SIGSEGV)
""")


def test_a_crash_after_xgrammar_loaded_goes_to_the_handler_that_was_there():
    crashed = subprocess.run([sys.executable, "-c", CRASH_AFTER_A_COMPILE, tiny_model("opt-60x3")],
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGSEGV, crashed.stderr[-2000:]
    assert "Fatal Python error: Segmentation fault" in crashed.stderr, crashed.stderr[-2000:]
    assert "Segfault encountered" not in crashed.stderr  # tvm_ffi's handler's first line
