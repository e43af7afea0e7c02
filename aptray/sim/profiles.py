"""Read the vidur operator profiles (data only): per-layer GEMM/elementwise timings, all-reduce and send/recv latency."""
from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass

# vendored with the package (aptray/sim/data/vidur-profiles, MIT: its LICENSE and README say whence)
DEFAULT_PROFILE_DIR = os.environ.get(
    "APTRAY_VIDUR_PROFILES", os.path.join(os.path.dirname(__file__), "data", "vidur-profiles"))

GEMM_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
ELEMENTWISE_OPS = ("input_layernorm", "post_attention_layernorm", "mlp_act", "add")


@dataclass(frozen=True)
class OpSample:
    """One profiled op on one GPU: a GEMM (m x k) @ (k x n), or an elementwise op moving `bytes`."""
    model: str
    op: str
    tp: int
    m: int  # tokens
    k: int
    n: int
    bytes: float  # HBM bytes moved (fp16)
    seconds: float

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


@dataclass(frozen=True)
class AllReduceSample:
    size: int  # elements (fp16)
    num_workers: int
    seconds: float


@dataclass(frozen=True)
class SendRecvSample:
    size: int  # elements (fp16) sent from one GPU to another
    seconds: float


def _gemm_shape(op: str, row: dict, tp: int) -> tuple[int, int]:
    """(k, n) of the per-GPU weight for a profiled op, with tensor-parallel sharding."""
    d, heads, kv_heads = int(row["n_embd"]), int(row["n_head"]), int(row["n_kv_head"])
    ffn, gated = int(row["n_expanded_embd"]), row["use_gated_mlp"] == "True"
    head_dim = d // heads
    if op == "attn_pre_proj":
        return d, (heads + 2 * kv_heads) * head_dim // tp
    if op == "attn_post_proj":
        return heads * head_dim // tp, d
    if op == "mlp_up_proj":
        return d, (2 if gated else 1) * ffn // tp
    return ffn // tp, d  # mlp_down_proj


def _elementwise_bytes(op: str, row: dict, m: int, tp: int) -> float:
    d, ffn, gated = int(row["n_embd"]), int(row["n_expanded_embd"]), row["use_gated_mlp"] == "True"
    if op == "mlp_act":  # reads the up-projection output, writes the activation
        return 2.0 * m * (ffn // tp) * ((2 if gated else 1) + 1)
    if op == "add":  # residual: two reads, one write
        return 2.0 * m * d * 3
    return 2.0 * m * d * 2  # layernorm: read and write


def load_op_samples(profile: str, root: str = DEFAULT_PROFILE_DIR) -> list[OpSample]:
    """All GEMM and elementwise samples (median timings) of compute/<profile>/*/*/mlp.csv."""
    paths = sorted(glob.glob(os.path.join(root, "compute", profile, "*", "*", "mlp.csv")))
    if not paths:
        raise FileNotFoundError(f"no vidur profiles under {root}/compute/{profile}")
    out = []
    for path in paths:
        model = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            for row in csv.DictReader(f):
                m, tp = int(row["num_tokens"]), int(row["num_tensor_parallel_workers"])
                for op in GEMM_OPS:
                    k, n = _gemm_shape(op, row, tp)
                    nbytes = 2.0 * (k * n + m * k + m * n)
                    out.append(OpSample(model, op, tp, m, k, n, nbytes, float(row[f"time_stats.{op}.median"]) * 1e-3))
                for op in ELEMENTWISE_OPS:
                    if f"time_stats.{op}.median" not in row:  # phi-2 has one layernorm per layer
                        continue
                    out.append(OpSample(model, op, tp, m, 0, 0, _elementwise_bytes(op, row, m, tp),
                                        float(row[f"time_stats.{op}.median"]) * 1e-3))
    return out


def load_all_reduce(network: str, root: str = DEFAULT_PROFILE_DIR) -> list[AllReduceSample]:
    """Intra-node rows only (all workers on one node): tensor parallelism never spans nodes here."""
    path = os.path.join(root, "network", network, "all_reduce.csv")
    with open(path) as f:
        return [AllReduceSample(int(r["size"]), int(r["num_workers"]), float(r["time_stats.all_reduce.median"]) * 1e-3)
                for r in csv.DictReader(f) if r.get("devices_per_node", r["num_workers"]) == r["num_workers"]]


def load_send_recv(network: str, root: str = DEFAULT_PROFILE_DIR) -> list[SendRecvSample]:
    """Point-to-point GPU transfers with both GPUs on one node (NVLink): pipeline stages of one node.
    The cross-node rows (devices_per_node 1) are 5-20x slower and no stage boundary here leaves a node."""
    path = os.path.join(root, "network", network, "send_recv.csv")
    with open(path) as f:
        return [SendRecvSample(int(r["size"]), float(r["time_stats.send_recv.median"]) * 1e-3)
                for r in csv.DictReader(f) if r["devices_per_node"] == r["num_workers"]]
