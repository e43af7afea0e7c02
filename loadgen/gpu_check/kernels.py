"""Stage 1: every Triton kernel of aptray_kernels against its torch reference on the device.

Inputs are drawn fresh per case (CPU generator, then moved), unused slots of partial blocks hold NaN,
hidden caches are strided views of wider rows as in aptray.cache.pool. Cache writes and gathers must
equal the reference bit for bit; attention outputs are compared with the reference run in fp32 on
fp32 copies of the same inputs, by ||out - ref|| / ||ref|| against a tolerance per dtype.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from aptray_kernels import reference
from aptray_kernels.random_inputs import attention_weights, paged_rows, poison_unfilled, rotary_tables

from loadgen.gpu_check.budget import DeadlineExceeded
from loadgen.gpu_check.report import complete

# relative Frobenius error allowed per dtype (docs/KERNELS.md: fp32 far under 1e-3, bf16 operands 1e-3..1e-2)
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}
SCALE = 0.125


@dataclass(frozen=True)
class KernelCase:
    kernel: str
    dtype: str
    block_size: int
    heads: int = 0
    kv_heads: int = 0
    splits: int | None = None
    rotary: bool = False
    bias: bool = False


def cases(s) -> list[KernelCase]:
    """Every kernel at each (dtype, block size) of the sizes, MHA and GQA, forced splits at the first block size."""
    out = []
    for dtype, block_sizes in s.kernel_dtypes:
        for b in block_sizes:
            first = b == block_sizes[0]
            out += [KernelCase("write_kv", dtype, b, kv_heads=s.kernel_layouts[-1][1]),
                    KernelCase("write_hidden", dtype, b), KernelCase("gather_hidden", dtype, b)]
            for h, kv in s.kernel_layouts:
                out.append(KernelCase("paged_decode_attention", dtype, b, h, kv))
                if first:
                    out.append(KernelCase("paged_decode_attention", dtype, b, h, kv, splits=3))
                out.append(KernelCase("absorbed_decode_attention", dtype, b, h, kv, bias=True))
                if first:
                    out.append(KernelCase("absorbed_decode_attention", dtype, b, h, kv, splits=2))
                out.append(KernelCase("recompute_decode_attention", dtype, b, h, kv, rotary=True, bias=True))
                out.append(KernelCase("recompute_decode_attention", dtype, b, h, kv))
            out += [KernelCase("gather_project_kv", dtype, b, kv_heads=s.kernel_layouts[-1][1], rotary=r, bias=True)
                    for r in (True, False)]
    return out


def _errors(out, ref) -> tuple[float, float]:
    """(max |out - ref|, ||out - ref|| / ||ref||) in float64; NaN anywhere gives NaN."""
    out, ref = out.double(), ref.double()
    diff = out - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm().clamp_min(1e-30))


class _Inputs:
    """One case's random tensors, on the device in the case's dtype, and fp32 copies for the reference."""

    def __init__(self, case: KernelCase, s, device: str, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = getattr(torch, case.dtype)
        self.device = device
        self.tables, self.num_blocks, self.lens = paged_rows(case.block_size, s.kernel_lens, gen=self.gen)

    def put(self, t):
        return None if t is None else t.to(self.device, self.dtype)

    def kv_cache(self, case, head_dim, poison: bool = True):
        cache = torch.randn(self.num_blocks, 2, case.block_size, case.kv_heads, head_dim, generator=self.gen)
        if poison:
            poison_unfilled(cache, self.tables, self.lens, case.block_size)
        return self.put(cache)

    def hidden_cache(self, case, width, poison: bool = True):
        """A strided view: each block is a prefix of a wider row, as the pool lays hidden blocks out."""
        rows = torch.randn(self.num_blocks, case.block_size * width + 24, generator=self.gen)
        if poison:
            poison_unfilled(rows[:, :case.block_size * width].view(self.num_blocks, case.block_size, width),
                            self.tables, self.lens, case.block_size)
        return self.put(rows)[:, :case.block_size * width].view(self.num_blocks, case.block_size, width)

    def idx(self):
        return self.tables.to(self.device), self.lens.to(self.device)


def _check_write(case, s, device, seed, triton_ops):
    x = _Inputs(case, s, device, seed)
    d = s.kernel_head_dim
    slots = torch.randperm(x.num_blocks * case.block_size, generator=x.gen)[:s.kernel_write_tokens].to(device)
    if case.kernel == "write_kv":
        cache = x.kv_cache(case, d, poison=False)
        k, v = (x.put(torch.randn(len(slots), case.kv_heads, d, generator=x.gen)) for _ in range(2))
        expected = cache.clone()
        reference.write_kv(expected, k, v, slots)
        triton_ops.write_kv(cache, k, v, slots)
        return cache, expected
    cache = x.hidden_cache(case, s.kernel_width, poison=False)
    if case.kernel == "write_hidden":
        h = x.put(torch.randn(len(slots), s.kernel_width, generator=x.gen))
        expected = cache.clone()
        reference.write_hidden(expected, h, slots)
        triton_ops.write_hidden(cache, h, slots)
        return cache, expected
    tables, lens = x.idx()
    max_len = int(x.lens.max())
    return triton_ops.gather_hidden(cache, tables, max_len), reference.gather_hidden(cache, tables, max_len)


def _check_attention(case, s, device, seed, triton_ops):
    x = _Inputs(case, s, device, seed)
    d, width = s.kernel_head_dim, s.kernel_width
    tables, lens = x.idx()
    q = x.put(torch.randn(len(x.lens), case.heads, d, generator=x.gen))
    f = {}  # fp32 copies of the inputs, for the reference
    if case.kernel == "paged_decode_attention":
        cache = x.kv_cache(case, d)
        out = triton_ops.paged_decode_attention(q, cache, tables, lens, SCALE, num_splits=case.splits)
        return out, reference.paged_decode_attention(q.float(), cache.float(), tables, lens, SCALE)
    cache = x.hidden_cache(case, width)
    w_k, b_k, w_v, b_v = (x.put(t) for t in attention_weights(case.kv_heads, d, width, case.bias, x.gen))
    for name, t in dict(w_k=w_k, b_k=b_k, w_v=w_v, b_v=b_v).items():
        f[name] = None if t is None else t.float()
    if case.kernel == "absorbed_decode_attention":
        out = triton_ops.absorbed_decode_attention(q, cache, tables, lens, w_k, w_v, b_v, SCALE, num_splits=case.splits)
        return out, reference.absorbed_decode_attention(q.float(), cache.float(), tables, lens, f["w_k"], f["w_v"],
                                                        f["b_v"], SCALE)
    cos, sin = (t.to(device) for t in rotary_tables(max(s.kernel_lens) + 8, d)) if case.rotary else (None, None)
    out = triton_ops.recompute_decode_attention(q, cache, tables, lens, w_k, b_k, w_v, b_v, SCALE, cos, sin)
    return out, reference.recompute_decode_attention(q.float(), cache.float(), tables, lens, f["w_k"], f["b_k"],
                                                     f["w_v"], f["b_v"], SCALE, cos, sin)


def _check_conversion(case, s, device, seed, triton_ops):
    """hidden -> KV: gather_project_kv == project_kv(gather_hidden(...)); K and V side by side."""
    x = _Inputs(case, s, device, seed)
    d, width = s.kernel_head_dim, s.kernel_width
    cache = x.hidden_cache(case, width, poison=False)
    tables, _ = x.idx()
    max_len = int(x.lens.max())
    w_k, b_k, w_v, b_v = (x.put(t) for t in attention_weights(case.kv_heads, d, width, case.bias, x.gen))
    cos, sin = (t.to(device) for t in rotary_tables(max_len + 8, d)) if case.rotary else (None, None)
    k, v = triton_ops.gather_project_kv(cache, tables, max_len, w_k, b_k, w_v, b_v, case.kv_heads, d, cos, sin)
    hidden = reference.gather_hidden(cache.float(), tables, max_len)
    rk, rv = reference.project_kv(hidden, w_k.float(), b_k.float(), w_v.float(), b_v.float(), case.kv_heads, d,
                                  cos, sin)
    return torch.stack((k, v)), torch.stack((rk, rv))


CHECKS = {"write_kv": _check_write, "write_hidden": _check_write, "gather_hidden": _check_write,
          "paged_decode_attention": _check_attention, "absorbed_decode_attention": _check_attention,
          "recompute_decode_attention": _check_attention, "gather_project_kv": _check_conversion}
EXACT = ("write_kv", "write_hidden", "gather_hidden")


def run_case(case: KernelCase, s, device: str, seed: int) -> dict:
    from aptray_kernels import triton_ops
    row = asdict(case)
    try:
        out, ref = CHECKS[case.kernel](case, s, device, seed, triton_ops)
        if device == "cuda":
            torch.cuda.synchronize()
        row["max_abs"], row["rel"] = _errors(out, ref)
        row["tol"] = 0.0 if case.kernel in EXACT else TOLERANCE[case.dtype]
        row["ok"] = bool(torch.equal(out, ref)) if case.kernel in EXACT else bool(row["rel"] <= row["tol"])
    except DeadlineExceeded:
        raise
    except Exception as exc:  # a failing kernel is a result, not the end of the stage
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
    return row


def run(ctx, pace, result: dict) -> None:
    s = ctx.sizes
    rows = result.setdefault("cases", [])
    all_cases = cases(s)
    for i, case in enumerate(pace.each(all_cases, s.kernel_case_estimate_s)):
        rows.append(run_case(case, s, ctx.device, seed=i))
        if not rows[-1]["ok"]:
            ctx.log(f"kernel case failed: {rows[-1]}")
    failed = [r for r in rows if not r["ok"]]
    worst = {}
    for r in rows:
        if "rel" in r and r["kernel"] not in EXACT:
            worst[r["dtype"]] = max(worst.get(r["dtype"], 0.0), r["rel"])
    result["summary"] = {"cases": len(all_cases), "run": len(rows), "passed": len(rows) - len(failed),
                         "failed": [f"{r['kernel']} {r['dtype']} B={r['block_size']} H={r['heads']}/{r['kv_heads']}"
                                    for r in failed],
                         "worst_rel_by_dtype": worst}
    result["targets"] = {"kernels_within_tolerance": {
        "met": complete(failed, rows, all_cases), "value": f"{len(rows) - len(failed)}/{len(all_cases)}",
        "target": "every kernel case within tolerance"}}

