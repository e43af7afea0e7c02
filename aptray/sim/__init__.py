"""Simulator: the real Engine and schedulers driven by a virtual clock and a cost-model executor."""
import os


def configs_dir() -> str:
    """HF config.json folders of the simulated models (opt-13b, opt-30b, opt-66b)."""
    return os.path.join(os.path.dirname(__file__), "configs")
