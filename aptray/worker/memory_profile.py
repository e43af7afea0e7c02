"""How many cache blocks fit on a GPU: measured peak of a worst-case step, plus recompute scratch.

The worst-case step is one prefill of max_num_batched_tokens tokens (the most activations a
step can hold); the recompute path of hidden decode re-projects K and V for up to
recompute_scratch_tokens context tokens at a time per layer, counted on top.
"""
from __future__ import annotations

import torch

from aptray.cache.pool import CachePool
from aptray.model.step_context import build_step_context
from aptray.plan import BatchPlan, SeqPlan


def recompute_scratch_bytes(config, n_kv: int, dtype: torch.dtype) -> int:
    """Transient bytes of one recompute chunk: gathered x plus projected K and V (fp32 scores aside)."""
    spec = config.spec
    elem = torch.empty((), dtype=dtype).element_size()
    return config.recompute_scratch_tokens * (spec.hidden_size + 2 * n_kv * spec.head_dim) * elem * 2


@torch.inference_mode()
def run_worst_case_step(model, config, n_kv: int, dtype: torch.dtype, device) -> None:
    """One prefill of max_num_batched_tokens tokens through a throwaway pool sized for it."""
    spec = config.spec
    tokens = min(config.max_num_batched_tokens, spec.max_model_len)
    blocks = -(-tokens // config.block_size)
    pool = CachePool(spec.num_layers, blocks, config.block_size, n_kv, spec.head_dim, spec.hidden_size,
                     config.hidden_block_size, dtype, device)
    seq = SeqPlan("profile", tuple([0] * tokens), 0, "kv", tuple(range(blocks)), True)
    ids, ctx = build_step_context(BatchPlan(0, (seq,)), config.block_size, config.hidden_block_size,
                                  config.hidden_attention, device)
    h = model(ids, ctx, pool.layers())
    model.compute_logits(h[ctx.sample_rows])


def gpu_cache_blocks(model, config, n_kv: int, dtype: torch.dtype, device) -> int:
    """Blocks that fit in gpu_memory_utilization of the device after weights, peak activations and scratch."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run_worst_case_step(model, config, n_kv, dtype, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)  # weights + the step's activations
    total = torch.cuda.get_device_properties(device).total_memory
    free_for_cache = total * config.gpu_memory_utilization - peak - recompute_scratch_bytes(config, n_kv, dtype)
    per_block = CachePool.bytes_per_block(config.spec.num_layers, config.block_size, n_kv, config.spec.head_dim, dtype)
    torch.cuda.empty_cache()
    if free_for_cache < per_block:
        raise RuntimeError(f"no GPU memory left for the cache: peak step uses {peak / 2**30:.1f} GiB of "
                           f"{total / 2**30:.1f} GiB; lower max_num_batched_tokens or raise gpu_memory_utilization")
    return int(free_for_cache // per_block)
