"""Start-up's objects out of the cyclic GC's sight, as vLLM freezes its heap once its engine is up
(vllm/utils/gc_utils.py, freeze_gc_heap).

The model, torch's and the server's modules and the scheduler live as long as the process. Frozen,
a collection walks only what requests make: with thousands of requests running, collections that
walked the whole heap set the p99 of a scheduling decision (docs/SCHEDULER.md, "Decision tail")."""
from __future__ import annotations

import atexit
import gc

_unfreeze_at_exit = False


def freeze_startup_heap() -> None:
    global _unfreeze_at_exit
    gc.collect()
    gc.freeze()
    if not _unfreeze_at_exit:  # the interpreter's last collection frees them again (C extensions check for leaks)
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True
