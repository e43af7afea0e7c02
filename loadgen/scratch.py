"""Scratch directories for the models and configs a benchmark makes: removed when the process exits."""
from __future__ import annotations

import atexit
import shutil
import tempfile


def scratch_dir(prefix: str = "aptray-") -> str:
    """A new directory, removed at this process's exit (a benchmark run leaves nothing in /tmp)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path
