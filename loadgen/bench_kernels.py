"""Decode-attention kernel benchmark: paged KV vs absorbed hidden cache, on an OPT-13B-shaped layer.

    python loadgen/bench_kernels.py --out kernels.json            # CUDA GPU: full grid
    python loadgen/bench_kernels.py --cpu --out /tmp/smoke.json   # no GPU: tiny sizes, Triton interpreter

Reports per (context, batch): time of each kernel, achieved bandwidth over the bytes it must read
(and % of the HBM peak), and absorbed-hidden time / KV time. End-to-end decode tokens/s is engine work
(aptray/model) and is not measured here. DeepSpeed-inference v2 blocked kernels are probed and reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# Known HBM peaks (GB/s), by a substring of torch.cuda.get_device_name(); --peak-gbps overrides.
HBM_PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
                 "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "A10G": 600}

OPT_13B = dict(hidden=5120, heads=40, kv_heads=40, head_dim=128)
TINY = dict(hidden=64, heads=4, kv_heads=4, head_dim=16)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--cpu", action="store_true", help="smoke run on CPU through the Triton interpreter")
    p.add_argument("--contexts", default="512,1024,2048,4096,8192")
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--block-size", type=int, default=16, help="KV tokens per block; hidden blocks hold 1/r as many")
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM peak if the device is not in the table")
    p.add_argument("--max-gb", type=float, default=40.0, help="skip points whose KV cache would exceed this")
    p.add_argument("--recompute-max-batch", type=int, default=8, help="also time the recompute path up to this batch")
    return p.parse_args()


def main():
    args = parse_args()
    if args.cpu:
        # Must be set before triton is first imported (it decides interpreter vs compiler at import).
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench_kernels: no CUDA device. This benchmark measures GPU kernels; use --cpu for a smoke run.")
    from aptray_kernels import reference, triton_ops

    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else getattr(torch, args.dtype)
    shape = TINY if args.cpu else OPT_13B
    contexts = [32, 64] if args.cpu else [int(c) for c in args.contexts.split(",")]
    batches = [1, 2] if args.cpu else [int(b) for b in args.batches.split(",")]
    timer = cpu_timer if args.cpu else cuda_timer
    torch.manual_seed(0)

    info = device_info(args.cpu, args.peak_gbps)
    info["deepspeed"] = _probe_deepspeed()
    print(f"device: {info['device']}  HBM peak: {info['peak_gbps']} GB/s  copy: {info['copy_gbps']} GB/s")
    print(f"deepspeed v2 blocked kernels: {info['deepspeed']}")

    layer = Layer(shape, dtype, device)
    _check_against_reference(layer, args.block_size, reference, triton_ops, torch)

    rows = []
    print(HEADER)
    print("-" * len(HEADER))
    for ctx in contexts:
        for batch in batches:
            if layer.kv_bytes(ctx, batch) / 1e9 > args.max_gb:
                continue
            row = bench_point(layer, ctx, batch, args.block_size, args.recompute_max_batch, timer, info["peak_gbps"])
            rows.append(row)
            print(format_row(row))
            if device == "cuda":
                torch.cuda.empty_cache()

    result = dict(info, shape=shape, dtype=str(dtype), block_size=args.block_size, rows=rows,
                  notes=["kv_gbps / hidden_gbps count the cache bytes each path must read once: "
                         "N*ctx*2*n_kv*D and N*ctx*d elements",
                         "the hidden path is two passes (scores, weighted sum) and reads x twice from the cache",
                         "absorbed_ms includes the u = W_k^T q and W_v y matmuls around the hidden kernel",
                         "end-to-end decode tokens/s is measured by the engine, not here"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


HEADER = (f"{'ctx':>6} {'batch':>5} | {'kv ms':>8} {'kv GB/s':>8} {'kv %pk':>6} | {'hid ms':>8} {'hid GB/s':>8} "
          f"{'hid %pk':>7} | {'absorbed ms':>11} | {'hid/kv':>6} {'abs/kv':>6} | {'recomp ms':>9}")


class Layer:
    """Random weights of one attention layer (this rank's rows of W_k, W_v)."""

    def __init__(self, shape, dtype, device):
        import torch
        self.shape, self.dtype, self.device = shape, dtype, device
        self.elem = torch.finfo(dtype).bits // 8
        rows, width = shape["kv_heads"] * shape["head_dim"], shape["hidden"]
        self.w_k = torch.randn(rows, width, dtype=dtype, device=device) / math.sqrt(width)
        self.w_v = torch.randn(rows, width, dtype=dtype, device=device) / math.sqrt(width)
        self.b_k = torch.randn(rows, dtype=dtype, device=device) * 0.1
        self.b_v = torch.randn(rows, dtype=dtype, device=device) * 0.1
        self.scale = 1 / math.sqrt(shape["head_dim"])

    def kv_bytes(self, ctx, batch):
        """The KV cache bytes a decode at this point must read: N*ctx*2*n_kv*D elements."""
        return batch * ctx * 2 * self.shape["kv_heads"] * self.shape["head_dim"] * self.elem

    def hidden_bytes(self, ctx, batch):
        """The hidden cache bytes an absorbed decode must read: N*ctx*d elements."""
        return batch * ctx * self.shape["hidden"] * self.elem

    def hidden_block(self, block_size):
        # r = d / (2 n_kv D): a physical block of B KV tokens holds B / r hidden tokens.
        r = self.shape["hidden"] / (2 * self.shape["kv_heads"] * self.shape["head_dim"])
        return max(1, int(block_size / r))

    def caches(self, ctx, batch, block_size):
        import torch
        s, dev = self.shape, self.device
        kv_blocks = math.ceil(ctx / block_size)
        kv_cache = torch.randn(batch * kv_blocks, 2, block_size, s["kv_heads"], s["head_dim"], dtype=self.dtype,
                               device=dev)
        kv_tables = torch.randperm(batch * kv_blocks, device=dev).view(batch, kv_blocks)
        hb = self.hidden_block(block_size)
        h_blocks = math.ceil(ctx / hb)
        hidden = torch.randn(batch * h_blocks, hb, s["hidden"], dtype=self.dtype, device=dev)
        h_tables = torch.randperm(batch * h_blocks, device=dev).view(batch, h_blocks)
        lens = torch.full((batch,), ctx, dtype=torch.int64, device=dev)
        q = torch.randn(batch, s["heads"], s["head_dim"], dtype=self.dtype, device=dev)
        return q, kv_cache, kv_tables, hidden, h_tables, lens


def bench_point(layer, ctx, batch, block_size, recompute_max_batch, timer, peak_gbps=None):
    """Times of each decode path at one (context, batch), with achieved bandwidth over the bytes each must read."""
    import torch
    from aptray_kernels import triton_ops
    from aptray_kernels.triton_absorbed import hidden_attention

    q, kv_cache, kv_tables, hidden, h_tables, lens = layer.caches(ctx, batch, block_size)
    s = layer.shape
    u = torch.randn(batch, s["heads"], s["hidden"], dtype=torch.float32, device=layer.device) * 0.01
    row = dict(context=ctx, batch=batch)
    # max_len given, as the engine gives it: reading lens.max() back would put a sync in every timed call
    row["kv_ms"] = timer(lambda: triton_ops.paged_decode_attention(q, kv_cache, kv_tables, lens, layer.scale,
                                                                   max_len=ctx))
    row["hidden_ms"] = timer(lambda: hidden_attention(u, hidden, h_tables, lens, max_len=ctx))
    row["absorbed_ms"] = timer(lambda: triton_ops.absorbed_decode_attention(
        q, hidden, h_tables, lens, layer.w_k, layer.w_v, layer.b_v, layer.scale, max_len=ctx))
    row["recompute_ms"] = None
    if batch <= recompute_max_batch:
        row["recompute_ms"] = timer(lambda: triton_ops.recompute_decode_attention(
            q, hidden, h_tables, lens, layer.w_k, layer.b_k, layer.w_v, layer.b_v, layer.scale, max_len=ctx))
    del q, kv_cache, kv_tables, hidden, h_tables
    row["kv_gbps"] = layer.kv_bytes(ctx, batch) / row["kv_ms"] / 1e6
    row["hidden_gbps"] = layer.hidden_bytes(ctx, batch) / row["hidden_ms"] / 1e6
    row["kv_pct_peak"] = 100 * row["kv_gbps"] / peak_gbps if peak_gbps else None
    row["hidden_pct_peak"] = 100 * row["hidden_gbps"] / peak_gbps if peak_gbps else None
    row["hidden_over_kv"] = row["hidden_ms"] / row["kv_ms"]
    row["absorbed_over_kv"] = row["absorbed_ms"] / row["kv_ms"]
    return row


def ragged_check_point(layer, block_size):
    """A small ragged point (contexts 80, 33, 1): q, kv_cache, kv_tables, hidden, h_tables, lens."""
    import torch
    q, kv_cache, kv_tables, hidden, h_tables, _ = layer.caches(80, 3, block_size)
    return q, kv_cache, kv_tables, hidden, h_tables, torch.tensor([80, 33, 1], device=layer.device)


def check_tolerance(dtype) -> float:
    """Largest |kernel - reference| a checked kernel may show at the ragged point."""
    import torch
    return 1e-4 if dtype == torch.float32 else 3e-2


def _check_against_reference(layer, block_size, reference, triton_ops, torch):
    """One small ragged point checked against the torch references before anything is timed."""
    q, kv_cache, kv_tables, hidden, h_tables, lens = ragged_check_point(layer, block_size)
    pairs = {
        "paged": (triton_ops.paged_decode_attention(q, kv_cache, kv_tables, lens, layer.scale),
                  reference.paged_decode_attention(q, kv_cache, kv_tables, lens, layer.scale)),
        "absorbed": (triton_ops.absorbed_decode_attention(q, hidden, h_tables, lens, layer.w_k, layer.w_v,
                                                          layer.b_v, layer.scale),
                     reference.absorbed_decode_attention(q, hidden, h_tables, lens, layer.w_k, layer.w_v,
                                                         layer.b_v, layer.scale)),
    }
    for name, (out, ref) in pairs.items():
        err = (out.float() - ref.float()).abs().max().item()
        tol = check_tolerance(layer.dtype)
        if not err <= tol:
            sys.exit(f"bench_kernels: {name} kernel differs from the reference by {err:.3g} (> {tol}); not timing it")
    print("kernels match the references on a ragged check point")


def cuda_timer(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100)  # ms, median, L2 flushed between runs


def cpu_timer(fn):
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def device_info(cpu: bool, peak_gbps: float | None = None) -> dict:
    """The device's name, its HBM peak (table or peak_gbps) and a measured copy bandwidth."""
    import torch
    if cpu:
        return dict(device="cpu (Triton interpreter: timings are meaningless)", peak_gbps=peak_gbps,
                    copy_gbps=None)
    name = torch.cuda.get_device_name()
    peak = peak_gbps or next((v for k, v in HBM_PEAK_GBPS.items() if k in name), None)
    # A device-to-device copy shows what the memory system really sustains (reads + writes).
    x = torch.randn(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_timer(lambda: y.copy_(x))
    return dict(device=name, peak_gbps=peak, copy_gbps=round(2 * x.numel() * 4 / ms / 1e6, 1))


def _probe_deepspeed():
    """Whether deepspeed.inference.v2's blocked (ragged) attention kernels load here, and why not."""
    try:
        from deepspeed.inference.v2.kernels.ragged_ops import BlockedFlashAttn, LinearBlockedKVCopy  # noqa: F401
        from deepspeed.ops.op_builder import RaggedOpsBuilder
        RaggedOpsBuilder().load()
    except Exception as exc:  # not installed, no CUDA toolchain, unsupported GPU ...
        return dict(available=False, reason=f"{type(exc).__name__}: {exc}"[:300])
    return dict(available=True, reason="loaded; the timing harness (RaggedBatchWrapper + AtomBuilder inputs) "
                                       "is not written, see docs/KERNELS.md")


def format_row(row):
    def pct(v):
        return f"{v:6.1f}" if v is not None else "     -"
    recompute = f"{row['recompute_ms']:9.3f}" if row["recompute_ms"] is not None else "        -"
    return (f"{row['context']:>6} {row['batch']:>5} | {row['kv_ms']:8.3f} {row['kv_gbps']:8.1f} "
            f"{pct(row['kv_pct_peak'])} | {row['hidden_ms']:8.3f} {row['hidden_gbps']:8.1f} "
            f"{pct(row['hidden_pct_peak']):>7} | {row['absorbed_ms']:11.3f} | {row['hidden_over_kv']:6.2f} "
            f"{row['absorbed_over_kv']:6.2f} | {recompute}")


if __name__ == "__main__":
    main()
