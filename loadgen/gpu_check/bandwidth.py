"""Stage 3: decode attention at OPT-13B shapes (one layer, MHA: r = 1/2), paged KV against absorbed hidden.

loadgen/bench_kernels.py times each point (triton do_bench, median, L2 flushed); achieved bandwidth
counts the cache bytes each path must read once (N*ctx*2*n_kv*D and N*ctx*d elements), against the
device's datasheet HBM peak and a measured copy. absorbed_ms includes the u = W_k^T q and W_v y matmuls.
Then the absorbed kernels' tilings (triton_absorbed.Tiling) are timed against the default at a few
points, each checked against the reference first: what the default should become. Last, the sampler's
cost per step for each sampling control, as a ratio to greedy rows (loadgen/bench_sampler.py).
"""
from __future__ import annotations

import torch

from loadgen import bench_kernels

# the bandwidth and speed targets apply at these sizes and above
KV_TARGET = dict(batch=32, context=1024, pct_peak=70.0)
ABSORBED_TARGET = dict(context=1024, ratio=0.6)


def matmul_tflops(device: str) -> float | None:
    """A bf16 matmul of random data, 8192 cubed (the device's usable matrix rate), TFLOP/s."""
    if device != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    ms = bench_kernels.cuda_timer(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def run(ctx, pace, result: dict) -> None:
    s = ctx.sizes
    cpu = ctx.device != "cuda"
    info = bench_kernels.device_info(cpu)
    info["matmul_bf16_tflops"] = matmul_tflops(ctx.device)
    result["device"] = info
    ctx.state["device_rates"] = info  # the step-cost profile records them for devices aptray.sim does not list
    shape = bench_kernels.TINY if cpu else bench_kernels.OPT_13B
    dtype = torch.float32 if cpu else torch.bfloat16
    result.update(shape=shape, dtype=str(dtype), block_size=s.bw_block_size)
    timer = bench_kernels.cpu_timer if cpu else bench_kernels.cuda_timer
    layer = bench_kernels.Layer(shape, dtype, ctx.device)
    rows = result.setdefault("rows", [])
    points = [(c, b) for c in s.bw_contexts for b in s.bw_batches]
    for ctx_len, batch in pace.each(points, s.bw_point_estimate_s):
        row = bench_kernels.bench_point(layer, ctx_len, batch, s.bw_block_size, 0, timer, info["peak_gbps"])
        row["copy_pct"] = 100 * row["kv_gbps"] / info["copy_gbps"] if info["copy_gbps"] else None
        rows.append(row)
        ctx.log(bench_kernels.format_row(row))
        if not cpu:
            torch.cuda.empty_cache()
    result["tilings"] = tiling_sweep(ctx, pace, layer, timer)
    result["sampler"] = sampler_costs(ctx, pace)
    seeded = result["seeded_alone_vs_batched"] = seeded_alone_vs_batched(ctx)
    kv = [r["kv_pct_peak"] for r in rows if r["batch"] >= KV_TARGET["batch"] and r["context"] >= KV_TARGET["context"]
          and r["kv_pct_peak"] is not None]
    ratio = [r["absorbed_over_kv"] for r in rows if r["context"] >= ABSORBED_TARGET["context"]]
    result["summary"] = {"points": len(points), "run": len(rows),
                         "kv_pct_peak_min": min(kv) if kv else None, "kv_pct_peak_max": max(kv) if kv else None,
                         "absorbed_over_kv_max": max(ratio) if ratio else None,
                         "absorbed_over_kv_min": min(ratio) if ratio else None}
    result["targets"] = {
        "kv_bandwidth": {"met": min(kv) >= KV_TARGET["pct_peak"] if kv else None,
                         "value": None if not kv else f"{min(kv):.0f}-{max(kv):.0f}% of peak",
                         "target": "paged KV decode >= 70% of HBM peak at batch >= 32, context >= 1024"},
        "absorbed_over_kv": {"met": max(ratio) <= ABSORBED_TARGET["ratio"] if ratio else None,
                             "value": None if not ratio else f"{min(ratio):.2f}-{max(ratio):.2f}",
                             "target": "absorbed / KV time <= 0.6 at contexts >= 1024"},
        "seeded_batch_independent": {"met": seeded["differ"] == 0,
                                     "value": f"{seeded['differ']} of {seeded['trials']} draws differ",
                                     "target": "a seeded row draws the same token alone and in a batch"}}


def sampler_costs(ctx, pace) -> list[dict]:
    """Median ms of one sample() over sizes.sampler_rows decode rows for each bench_sampler case, and its
    ratio to greedy rows of the same batch."""
    from loadgen import bench_sampler
    s, rows = ctx.sizes, []
    for batch in pace.each(s.sampler_rows, 2.0):
        logits = torch.randn(batch, s.sampler_vocab, device=ctx.device).mul_(3)
        for row in bench_sampler.measure(logits, 10):
            rows.append(row)
            ctx.log(f"sampler rows={batch} {row['case']}: {row['ms']:.2f} ms ({row['x_greedy']:.1f}x greedy)")
    return rows


def seeded_alone_vs_batched(ctx, trials: int = 50) -> dict:
    """A seeded row's token sampled alone and as the first of a batch of sizes.sampler_rows[-1] rows
    (temperature 1, top_p 0.9): the same where the batch's kernels reduce each row as they would alone."""
    from loadgen import bench_sampler
    from aptray.model.sampler import sample
    s, differ = ctx.sizes, 0
    others = [bench_sampler.decode_row(i, top_p=0.9) for i in range(1, s.sampler_rows[-1])]
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    for trial in range(trials):
        logits = torch.randn(len(others) + 1, s.sampler_vocab, device=ctx.device).mul_(3)
        seeded = bench_sampler.decode_row(0, seed=trial, top_p=0.9)
        alone, _, _ = sample(logits[:1], [seeded], generator)
        batched, _, _ = sample(logits, [seeded] + others, generator)
        differ += alone[0] != batched[0]
    return {"trials": trials, "differ": differ}


def tiling_sweep(ctx, pace, layer, timer) -> list[dict]:
    """absorbed_ms of each tiling in sizes.bw_tilings at each of sizes.bw_tiling_points, beside the default's
    (over_default < 1: faster). A tiling that differs from the reference on a ragged check is not timed."""
    from aptray_kernels import reference
    from aptray_kernels.triton_absorbed import DEFAULT_TILING, Tiling, absorbed_decode_attention
    s = ctx.sizes
    check_q, _, _, check_hidden, check_tables, check_lens = bench_kernels.ragged_check_point(layer, s.bw_block_size)
    check = (check_q, check_hidden, check_tables, check_lens, layer.w_k, layer.w_v, layer.b_v, layer.scale)
    want = reference.absorbed_decode_attention(*check)
    tol = bench_kernels.check_tolerance(layer.dtype)
    rows = []
    for ctx_len, batch in s.bw_tiling_points:
        q, _, _, hidden_p, tables_p, lens_p = layer.caches(ctx_len, batch, s.bw_block_size)

        def absorbed_ms(tiling):
            return timer(lambda: absorbed_decode_attention(q, hidden_p, tables_p, lens_p, layer.w_k, layer.w_v,
                                                           layer.b_v, layer.scale, max_len=ctx_len, tiling=tiling))
        base = absorbed_ms(DEFAULT_TILING)
        for block_t, block_d, warps in pace.each(s.bw_tilings, s.bw_tiling_estimate_s):
            tiling = Tiling(block_t, block_d, warps)
            row = {"context": ctx_len, "batch": batch, "block_t": block_t, "block_d": block_d, "num_warps": warps,
                   "default_ms": base}
            try:
                got = absorbed_decode_attention(*check, tiling=tiling)
                err = float((got.float() - want.float()).abs().max())
                row["max_error"] = err
                if err <= tol:
                    row["ms"] = absorbed_ms(tiling)
                    row["over_default"] = row["ms"] / base
            except Exception as exc:  # noqa: BLE001 - a tiling the compiler refuses (registers, shared memory)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
        best = min((r for r in rows if r["context"] == ctx_len and r["batch"] == batch and "ms" in r),
                   key=lambda r: r["ms"], default=None)
        if best:
            ctx.log(f"absorbed tilings at {ctx_len} x {batch}: default {base:.3f} ms, best {best['ms']:.3f} ms "
                    f"(block_t {best['block_t']}, block_d {best['block_d']}, warps {best['num_warps']})")
        del q, hidden_p, tables_p, lens_p
    return rows
