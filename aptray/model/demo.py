"""The embedded demo model, known by name: `tiny-opt-v1` is a seeded random-weight OPT (d 64, 2
layers) that every process builds for itself the first time it is named, so a node that has never
seen it (a shard on another machine) resolves the same name to the same weights.

resolve_model_path("tiny-opt-v1") (or "") -> its folder; any other name is a path and is returned
as given. Torch is imported only to build the model.
"""
from __future__ import annotations

import os
import shutil

DEMO_MODEL = "tiny-opt-v1"


def demo_model_dir() -> str:
    root = os.environ.get("APTRAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "aptray"))
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, DEMO_MODEL)


def resolve_model_path(model: str) -> str:
    """A model's folder: the demo model's (built here if missing) for its name or "", else model."""
    if model in ("", DEMO_MODEL):
        return ensure_demo_model(demo_model_dir())
    return model


def ensure_demo_model(path: str) -> str:
    """Make the demo model at path unless it is there. Written to a temporary folder and renamed, so
    concurrent processes never see half a model."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from aptray.model.factory import make_tiny_model
    tmp = f"{path}.tmp{os.getpid()}"
    make_tiny_model(tmp, arch="opt", hidden_size=64, num_layers=2, num_heads=4, max_positions=512, seed=0)
    try:
        os.rename(tmp, path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path
