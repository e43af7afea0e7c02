"""Stage 4: step costs of the real engine (ModelRunner) with OPT-13B-shaped random weights on the
device: prefill steps, decode steps of KV and hidden (absorbed) requests, mixed steps. The simulator's
own cost model is fitted to them (aptray.sim.calibrate.fit_steps) and written as a measured profile,
<out>/<gpu>.json, that `--sim --gpu <gpu>` prices steps with once it is in aptray/sim/data/measured/.

A step's time is ModelRunner.execute's: building the step's tensors, the model, sampling, and a
device synchronize, on the wall clock. Each plan runs once to warm up (kernel compilation), then
`repeats` times; the fit takes the median per shape. Cache contents do not matter for timing, so plans
name blocks directly; a point whose blocks do not fit in the pool is skipped. What a whole engine step
adds around the runner (the apt scheduler, post-processing) is measured on waves of requests through
the engine (aptray.sim.calibrate.collect_steps) and added to the profile's per-step and per-sequence
host overheads.
"""
from __future__ import annotations

import datetime
import math
import os
import time

from dataclasses import replace

import numpy as np
import torch

from aptray.plan import BatchPlan, SeqPlan

KINDS = ("kv", "hidden")


def model_dir(ctx) -> str:
    """OPT-13B's config (aptray/sim/configs) on a GPU; a tiny OPT config in the smoke run."""
    if ctx.sizes.model == "opt-13b":
        from aptray.sim import configs_dir
        return os.path.join(configs_dir(), "opt-13b")
    path = os.path.join(ctx.work_dir, "opt-smoke")
    if not os.path.isfile(os.path.join(path, "config.json")):
        from transformers import OPTConfig
        OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=512,
                  max_position_embeddings=512, word_embed_proj_dim=64).save_pretrained(path)
    return path


def engine_config(ctx, **kwargs):
    from aptray.config import EngineConfig
    s = ctx.sizes
    return EngineConfig(model=model_dir(ctx), dtype=s.dtype, load_format="dummy", skip_tokenizer_init=True,
                        block_size=s.block_size, **kwargs)


def runner(ctx):
    """The device's one ModelRunner (random weights, hybrid pool), built once and shared with the replay."""
    if "runner" not in ctx.state:
        from aptray.worker.model_runner import ModelRunner
        s = ctx.sizes
        config = engine_config(ctx, cache_mode="hybrid", hidden_attention="absorbed",
                               max_num_batched_tokens=max(s.prefill_tokens), num_cache_blocks=s.num_cache_blocks)
        ctx.state["runner"] = ModelRunner(config)
        ctx.log(f"model runner: {ctx.state['runner'].num_blocks} cache blocks of {s.block_size} tokens")
    return ctx.state["runner"]


class _Plans:
    """BatchPlans of given shapes over consecutive physical blocks; raises MemoryError when a plan does
    not fit in the pool."""

    def __init__(self, runner, seed: int = 0):
        cfg = runner.config
        self.per_block = {"kv": cfg.block_size, "hidden": cfg.hidden_block_size}
        self.num_blocks, self.max_len = runner.num_blocks, cfg.spec.max_model_len
        self.vocab = cfg.spec.vocab_size
        self.rng = np.random.default_rng(seed)

    def _seq(self, rid, n, start, kind, used):
        blocks = math.ceil((start + n) / self.per_block[kind])
        if used[0] + blocks > self.num_blocks:
            raise MemoryError("the plan's blocks do not fit in the pool")
        table = tuple(range(used[0], used[0] + blocks))
        used[0] += blocks
        ids = tuple(int(t) for t in self.rng.integers(4, self.vocab, n))
        return SeqPlan(rid, ids, start, kind, table, True)

    def plan(self, kind, prefill=0, start=0, batch=0, context=0, hidden=0) -> BatchPlan:
        """prefill tokens in chunks of at most the model context (from position start), plus batch decodes
        at context, the first `hidden` of them hidden whatever kind says."""
        used, seqs = [0], []
        while prefill > 0:
            n = min(prefill, self.max_len - start)
            seqs.append(self._seq(f"p{len(seqs)}", n, start, kind, used))
            prefill -= n
        seqs += [self._seq(f"d{i}", 1, context - 1, "hidden" if i < hidden else kind, used) for i in range(batch)]
        return BatchPlan(1, tuple(seqs))


def points(s) -> list[dict]:
    out = [dict(kind=k, prefill=t) for t in s.prefill_tokens for k in KINDS]
    out += [dict(kind=k, batch=b, context=c) for c in s.decode_contexts for b in s.decode_batches for k in KINDS]
    out += [dict(kind=k, prefill=q, start=p, batch=b, context=c) for q, p, b, c in s.mixed_steps for k in KINDS]
    out += [dict(kind="kv", batch=b, context=c, hidden=h) for b, c, h in s.mixed_kind_decodes]
    return out


def _kind_of(point: dict) -> str:
    if point.get("hidden"):
        return "decode_both"
    if point.get("prefill") and point.get("batch"):
        return "mixed"
    return "prefill" if point.get("prefill") else f"decode_{point['kind']}"


def device_record(ctx) -> dict:
    """What the profile says of the device: its --gpu name, memory, and the rates aptray.sim.gpus knows or
    stage 3 measured (a GpuSpec for devices the simulator does not list)."""
    from aptray.sim.gpus import GPUS, gpu_key
    if ctx.device == "cuda":
        name = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        name, memory = "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    key = gpu_key(name)
    known = GPUS.get(key)
    measured = ctx.state.get("device_rates", {})
    return {"name": name, "key": key, "memory_bytes": int(memory),
            "hbm_bandwidth": known.hbm_bandwidth if known else (measured.get("copy_gbps") or 0.0) * 1e9,
            "peak_flops": known.peak_flops if known else (measured.get("matmul_bf16_tflops") or 0.0) * 1e12,
            "torch": torch.__version__}


def host_overhead(ctx, r) -> dict:
    """Seconds a whole engine step takes beyond ModelRunner.execute, as a + b * sequences (least squares
    over the steps of a few waves of requests through an apt engine on the shared runner)."""
    from aptray.executor.local import LocalExecutor
    from aptray.sim.calibrate import collect_steps
    s = ctx.sizes
    config = engine_config(ctx, scheduler="apt", cache_mode="hybrid", num_cache_blocks=r.num_blocks)
    steps = collect_steps(config, s.wave_batches, s.wave_prompts, s.wave_output, repeats=1,
                          executor=LocalExecutor(config, r), clock=time.perf_counter)
    extra = np.array([st.seconds - st.executor_seconds for st in steps])
    nseq = np.array([len(st.seqs) for st in steps], dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(nseq), nseq], 1), extra, rcond=None)
    return {"steps": len(steps), "per_step_s": max(float(a), 0.0), "per_seq_s": max(float(b), 0.0),
            "median_s": float(np.median(extra)), "median_step_s": float(np.median([st.seconds for st in steps]))}


def run(ctx, pace, result: dict) -> None:
    from aptray.sim.calibrate import GPU_X0, StepSample, _X0, fit_steps, predict

    s = ctx.sizes
    r = runner(ctx)
    plans = _Plans(r)
    samples, shapes, table = [], [], result.setdefault("table", [])
    result.update(model=s.model, dtype=s.dtype, block_size=s.block_size, num_blocks=r.num_blocks,
                  hidden_block_size=r.config.hidden_block_size, repeats=s.step_repeats)
    skipped = 0
    for point in pace.each(points(s), s.step_point_estimate_s):
        try:
            plan = plans.plan(**point)
        except MemoryError:
            skipped += 1
            continue
        r.execute(plan)  # warm-up: kernel compilation, first touch of the blocks
        times = [r.execute(plan).step_time for _ in range(s.step_repeats)]
        shape = [(q.cache_kind, len(q.token_ids), q.context_len, q.sample) for q in plan.seqs]
        samples += [StepSample(shape, [], t) for t in times]
        shapes.append(StepSample(shape, [], float(np.median(times))))  # the fit's sample: the median step
        table.append({**point, "kind_of_step": _kind_of(point), "ms": 1e3 * float(np.median(times)),
                      "spread": float(max(times) / min(times))})
    result["points_without_room"] = skipped
    if len(samples) < 12:
        raise RuntimeError(f"only {len(samples)} step samples: too few to fit the cost model")
    device = device_record(ctx)
    if pace.left() > s.wave_estimate_s:
        result["host_outside_runner"] = host_overhead(ctx, r)
    config = r.config
    cal = fit_steps(shapes, config, GPU_X0 if ctx.device == "cuda" else _X0, profile=device["key"])
    predicted = predict(shapes, config, cal.hardware, cal.step_overhead)
    host = result.get("host_outside_runner")
    if host:  # the simulator prices whole engine steps
        cal.step_overhead += host["per_step_s"]
        cal.hardware = replace(cal.hardware, seq_overhead=cal.hardware.seq_overhead + host["per_seq_s"])
    by_kind = {}
    for row, smp, pred in zip(table, shapes, predicted):
        by_kind.setdefault(row["kind_of_step"], []).append(abs(pred / smp.seconds - 1))
        row["predicted_ms"] = 1e3 * float(pred)
    cal.meta = {"device": device, "model": s.model, "dtype": s.dtype, "block_size": s.block_size,
                "measured": "aptray ModelRunner.execute per step (wall clock, device synchronized), median of "
                            f"{s.step_repeats} after a warm-up", "date": datetime.datetime.now().isoformat(timespec="minutes"),
                "command": "python -m loadgen.gpu_check", "host_outside_runner": host,
                "steps": [[smp.seqs, smp.seconds] for smp in shapes]}
    path = os.path.join(ctx.out_dir, f"{device['key']}.json")
    cal.save(path)
    ctx.state.update(profile=path, gpu_key=device["key"])
    hw = cal.hardware
    result.update(gpu_key=device["key"], profile=path, steps=len(samples), shapes=len(shapes),
                  fit_error=vars(cal.error),
                  fit_error_by_kind={k: {"mean": float(np.mean(v)), "max": float(np.max(v)), "n": len(v)}
                                     for k, v in by_kind.items()},
                  coefficients={"step_overhead_s": cal.step_overhead, "seq_overhead_s": hw.seq_overhead,
                                "gemm": vars(hw.gemm), "elementwise": vars(hw.layernorm), "attention": vars(hw.attention)})
