"""What each stage runs: the GPU sizes (one H100/H200-class GPU, 8 minutes) and the CPU smoke sizes
(the same stages at toy sizes, seconds of work, Triton kernels in the interpreter)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # stage 1, kernels: (dtype, block sizes) in order of importance; (query heads, kv heads): MHA, GQA
    kernel_dtypes: tuple
    kernel_layouts: tuple
    kernel_head_dim: int
    kernel_width: int  # hidden size d of the absorbed / recompute cases: not a multiple of the d chunk
    kernel_lens: tuple  # ragged contexts: one token, partial last blocks, several tiles and splits
    kernel_write_tokens: int
    kernel_case_estimate_s: float
    # stage 2, engine exactness
    exact_models: tuple
    exact_bf16_models: tuple
    exact_prompts: int
    exact_max_tokens: int
    exact_case_estimate_s: float
    # stage 3, bandwidth (one layer of OPT-13B on a GPU; bench_kernels' tiny shape in the smoke run)
    bw_batches: tuple
    bw_contexts: tuple
    bw_block_size: int
    bw_point_estimate_s: float
    # the absorbed kernels' tilings timed against the default: (block_t, block_d, num_warps), at these
    # (context, batch) points
    bw_tilings: tuple
    bw_tiling_points: tuple
    bw_tiling_estimate_s: float
    # the sampler's cost per step (loadgen/bench_sampler.py): batches of decode rows over a vocabulary
    sampler_rows: tuple
    sampler_vocab: int
    # stage 4, step costs of the engine
    model: str  # "opt-13b" (aptray/sim/configs) or "opt-smoke" (a tiny OPT config)
    dtype: str
    block_size: int
    num_cache_blocks: int | None  # None: sized by the engine's GPU memory profile
    prefill_tokens: tuple
    decode_batches: tuple
    decode_contexts: tuple
    mixed_steps: tuple  # (prefill chunk, its start position, decodes, their context)
    # (decodes, their context, how many of them are hidden, the rest KV): what a step with a few hidden
    # rows among KV ones costs, the price apt's c_hany learns
    mixed_kind_decodes: tuple
    step_repeats: int
    step_point_estimate_s: float
    wave_batches: tuple  # waves of requests through the engine: its cost around the runner
    wave_prompts: tuple
    wave_output: int
    wave_estimate_s: float
    # stage 5, replay
    ttft_slo: float
    tbt_slo: float
    length_scale: float  # ShareGPT lengths times this (1 on a GPU)
    replay_min_requests: int
    replay_max_requests: int
    replay_drain_s: float  # time each run keeps after its last arrival, out of its share
    knee_search: tuple  # (lowest, highest) rate the knee search starts from
    knee_requests: int  # requests of each simulated run of the knee search


GPU = Sizes(
    kernel_dtypes=(("bfloat16", (16, 5, 1)), ("float16", (16, 5)), ("float32", (16,))),
    kernel_layouts=((16, 16), (16, 4)), kernel_head_dim=128, kernel_width=1000,
    kernel_lens=(1, 7, 33, 200, 517, 1100), kernel_write_tokens=50, kernel_case_estimate_s=3.0,
    exact_models=("opt", "llama", "llama-gqa"), exact_bf16_models=("opt", "llama", "llama-gqa"), exact_prompts=16,
    exact_max_tokens=24, exact_case_estimate_s=5.0,
    bw_batches=(16, 32, 64, 128), bw_contexts=(512, 1024, 2048, 4096), bw_block_size=16, bw_point_estimate_s=3.0,
    bw_tilings=tuple((t, d, w) for t in (16, 32, 64) for d in (64, 128, 256) for w in (4, 8)),
    bw_tiling_points=((1024, 32), (2048, 128)), bw_tiling_estimate_s=1.5,
    sampler_rows=(64, 256), sampler_vocab=50272,
    model="opt-13b", dtype="bfloat16", block_size=16, num_cache_blocks=None,
    prefill_tokens=(128, 256, 512, 1024, 2048, 4096), decode_batches=(1, 8, 32, 64, 128, 256),
    decode_contexts=(128, 500, 1000, 2000), mixed_steps=((256, 0, 16, 1000), (512, 1024, 16, 1000),
                                                         (256, 0, 64, 500), (512, 512, 64, 1000)),
    mixed_kind_decodes=((8, 500, 1), (64, 500, 1), (64, 500, 32)),
    step_repeats=5, step_point_estimate_s=3.0,
    wave_batches=(1, 8, 32), wave_prompts=(64, 256), wave_output=16, wave_estimate_s=15.0,
    ttft_slo=0.25, tbt_slo=0.1, length_scale=1.0, replay_min_requests=30, replay_max_requests=400,
    replay_drain_s=12.0, knee_search=(1.0, 16.0), knee_requests=200,
)

SMOKE = Sizes(
    # the interpreter computes bf16 through numpy, which has no bf16: fp32 and fp16 are what it can check
    kernel_dtypes=(("float32", (5, 1)), ("float16", (16,))),
    kernel_layouts=((4, 4), (4, 2)), kernel_head_dim=16, kernel_width=40,
    kernel_lens=(1, 7, 21), kernel_write_tokens=9, kernel_case_estimate_s=1.0,
    exact_models=("opt", "llama"), exact_bf16_models=("opt",), exact_prompts=8, exact_max_tokens=20,
    exact_case_estimate_s=2.0,
    bw_batches=(1, 2), bw_contexts=(32, 64), bw_block_size=16, bw_point_estimate_s=2.0,
    bw_tilings=((16, 32, 4), (64, 16, 8)), bw_tiling_points=((32, 2),), bw_tiling_estimate_s=1.0,
    sampler_rows=(4,), sampler_vocab=300,
    model="opt-smoke", dtype="float32", block_size=16, num_cache_blocks=512,
    prefill_tokens=(16, 64, 256), decode_batches=(1, 4, 16), decode_contexts=(16, 64, 200),
    mixed_steps=((32, 0, 4, 64), (32, 64, 4, 128)), mixed_kind_decodes=((4, 64, 1), (16, 64, 8)),
    step_repeats=3, step_point_estimate_s=1.0,
    wave_batches=(1, 4), wave_prompts=(8, 32), wave_output=8, wave_estimate_s=2.0,
    ttft_slo=0.01, tbt_slo=0.004, length_scale=1 / 16, replay_min_requests=6, replay_max_requests=10,
    replay_drain_s=1.0, knee_search=(2.0, 32.0), knee_requests=10,
)
