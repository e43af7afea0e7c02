"""GPUs the simulator prices: HBM size and bandwidth, dense fp16 peak, and which profiles apply."""
from __future__ import annotations

import re
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    profile: str  # compute/<profile>/ folder of the vidur profiles ("" for none)
    network: str  # network/<network>/ folder: DGX nodes (NVSwitch), all TP ranks in one node


# The a100 profiles were taken on A100-80GB SXM; the cost model carries their fitted efficiencies
# over to A100-40GB, whose HBM is slower (1.555 vs 2.039 TB/s) and smaller.
GPUS = {
    "a100-40gb": GpuSpec("a100-40gb", 40 * GiB, 1.555e12, 312e12, "a100", "a100_dgx"),
    "a100-80gb": GpuSpec("a100-80gb", 80 * GiB, 2.039e12, 312e12, "a100", "a100_dgx"),
    "h100-80gb": GpuSpec("h100-80gb", 80 * GiB, 3.35e12, 989e12, "h100", "h100_dgx"),
    # H200 SXM: the H100's processor with 141 GB (143,771 MiB) of HBM3e at 4.8 TB/s; without a measured
    # profile (aptray.sim.measured) it is priced by the H100 profiles scaled to its bandwidth
    "h200": GpuSpec("h200", 140 * GiB, 4.8e12, 989e12, "h100", "h100_dgx"),
}
PROFILED_GPU = {"a100": GPUS["a100-80gb"], "h100": GPUS["h100-80gb"]}
# torch.cuda.get_device_name() substrings -> GPUS keys, most specific first
DEVICE_NAMES = (("H200", "h200"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-80gb"), ("A100-SXM4-80GB", "a100-80gb"),
                ("A100 80GB", "a100-80gb"), ("A100", "a100-40gb"))


def gpu_key(device_name: str) -> str:
    """The --gpu name of a device (a GPUS key where there is one, else a slug of its name): what a
    profile measured on it is called."""
    for part, key in DEVICE_NAMES:
        if part in device_name:
            return key
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
