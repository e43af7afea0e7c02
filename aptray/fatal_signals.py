"""A process's handlers of fatal signals, kept across an import that would replace them.

xgrammar's runtime (tvm_ffi) installs its own SIGSEGV handler as it loads. That handler symbolizes a
backtrace before the process dies, and it can hang: a grammar sandbox child that hangs so sits to its
deadline using no CPU, which reads as a busy machine (429), not a crash. A hung router is worse than
a dead one: Ray reports a dead actor at once and the ingress starts a new router, which resumes the
requests from the store; a hung one holds them until the ingress's health check gives up on the
whole replica. So the process keeps the handlers it had: Ray's in an actor, faulthandler's or the
default action elsewhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
import threading

FATAL = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)
_SIGACTION_BYTES = 512  # more than any platform's struct sigaction (152 on Linux x86-64): kept opaque
_LOCK = threading.Lock()  # one at a time: a second thread would save the first's new handlers, then restore them


@contextlib.contextmanager
def kept():
    """Within it, code may install handlers of fatal signals; after it, the ones before are back. C
    handlers too (Ray's), which Python's signal module cannot read back. POSIX only: elsewhere nothing."""
    libc = _libc()
    with _LOCK:
        saved = []
        for signum in FATAL if libc is not None else ():
            action = ctypes.create_string_buffer(_SIGACTION_BYTES)
            if libc.sigaction(int(signum), None, action) == 0:
                saved.append((signum, action))
        try:
            yield
        finally:
            for signum, action in saved:
                libc.sigaction(int(signum), action, None)


def _libc():
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
