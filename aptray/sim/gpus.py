"""GPUs the simulator prices: HBM size and bandwidth, dense fp16 peak, and which profiles apply."""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    profile: str  # compute/<profile>/ folder of the vidur profiles
    network: str  # network/<network>/ folder: DGX nodes (NVSwitch), all TP ranks in one node


# The a100 profiles were taken on A100-80GB SXM; the cost model carries their fitted efficiencies
# over to A100-40GB, whose HBM is slower (1.555 vs 2.039 TB/s) and smaller.
GPUS = {
    "a100-40gb": GpuSpec("a100-40gb", 40 * GiB, 1.555e12, 312e12, "a100", "a100_dgx"),
    "a100-80gb": GpuSpec("a100-80gb", 80 * GiB, 2.039e12, 312e12, "a100", "a100_dgx"),
    "h100-80gb": GpuSpec("h100-80gb", 80 * GiB, 3.35e12, 989e12, "h100", "h100_dgx"),
}
PROFILED_GPU = {"a100": GPUS["a100-80gb"], "h100": GPUS["h100-80gb"]}


def get_gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown gpu {name!r}; known: {', '.join(GPUS)}") from None
