"""Step-cost profiles measured on a device by `python -m loadgen.gpu_check`: the simulator's cost model
fitted to aptray's own engine steps there, one JSON per device (aptray/sim/data/measured/<gpu>.json,
a Calibration with the device in its meta). Where one exists for a GPU, `--sim --gpu <gpu>` is priced
by it instead of by the vidur operator profiles; all-reduce laws, which one device cannot measure,
still come from those profiles.
"""
from __future__ import annotations

import os
from dataclasses import replace

from aptray.sim.gpus import GPUS, GpuSpec

MEASURED_DIR = os.path.join(os.path.dirname(__file__), "data", "measured")
DIR_ENV = "APTRAY_MEASURED_DIR"  # another folder to read profiles from (a gpu_check run's output)


def profile_path(gpu: str) -> str:
    return os.path.join(os.environ.get(DIR_ENV) or MEASURED_DIR, f"{gpu.lower()}.json")


def load_measured(gpu: str):
    """gpu's measured Calibration, or None."""
    path = profile_path(gpu)
    if not os.path.isfile(path):
        return None
    from aptray.sim.calibrate import Calibration
    return Calibration.load(path)


def measured_gpu(name: str) -> GpuSpec | None:
    """A GpuSpec from the device a measured profile records (for devices aptray.sim.gpus does not know)."""
    cal = load_measured(name)
    if cal is None:
        return None
    dev = cal.meta["device"]
    return GpuSpec(name.lower(), int(dev["memory_bytes"]), float(dev["hbm_bandwidth"]), float(dev["peak_flops"]), "", "")


def get_gpu(name: str) -> GpuSpec:
    """A known GPU (aptray.sim.gpus.GPUS), or a device that only a measured profile describes."""
    spec = GPUS.get(name.lower()) or measured_gpu(name)
    if spec is None:
        raise ValueError(f"unknown gpu {name!r}; known: {', '.join(GPUS)} (or a device with a measured profile)")
    return spec


def hardware_for_gpu(gpu: GpuSpec, step_overhead: float):
    """(HardwareFit, step overhead) that price steps on gpu: its measured profile (with its own fitted
    step overhead) where there is one, else the vidur fit and the given overhead."""
    from aptray.sim.fit import hardware_for
    cal = load_measured(gpu.name)
    if cal is None:
        return hardware_for(gpu), step_overhead
    hw = cal.hardware
    if gpu.profile:
        hw = replace(hw, all_reduce=hardware_for(gpu).all_reduce)
    return hw, cal.step_overhead
