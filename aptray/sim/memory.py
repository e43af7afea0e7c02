"""GPU memory per rank: weights, activations and overheads, and what is left for the cache pool.

The pool is counted in physical blocks of the engine's block manager: one block holds
block_size tokens of KV for every layer (or block_size / r tokens of hidden state).
"""
from __future__ import annotations

from dataclasses import dataclass

from aptray.config import ModelSpec
from aptray.sim.cost_model import DTYPE_BYTES
from aptray.sim.gpus import GiB, GpuSpec


@dataclass(frozen=True)
class MemoryPlan:
    total: int
    usable: int  # total * gpu_memory_utilization
    weights: int
    activations: int
    overhead: int  # CUDA context, allocator slack, communication buffers
    cache: int
    block_bytes: int
    num_blocks: int


def sharded_hidden_extra_weights(spec: ModelSpec, tp: int) -> int:
    """Bytes per rank of the W_k and W_v column slices (all heads, the rank's d/t inputs) that sharded
    hidden attention needs on top of the usual head-sharded weights (DESIGN section 2 says about +17%;
    the block of the slice that covers the rank's own heads is already there, so it is 1 - 1/t of that)."""
    if tp <= 1:
        return 0
    kv_out, d_in = 2 * spec.num_kv_heads * spec.head_dim, spec.hidden_size // tp
    return DTYPE_BYTES * spec.num_layers * (kv_out - kv_out // tp) * d_in


def weight_bytes(spec: ModelSpec, tp: int) -> int:
    """Parameters held by one rank (vocabulary and linears split over ranks; norms and biases replicated)."""
    d, f, q = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim
    kv = 2 * spec.num_kv_heads * spec.head_dim
    if spec.arch == "opt":
        linears = d * (q + kv) + q * d + 2 * d * f
        small = (q + kv) + d + f + d + 4 * d  # biases and two layernorms
        embeddings = spec.vocab_size * d // tp + spec.max_model_len * d  # LM head tied to the embedding
    else:
        linears = d * (q + kv) + q * d + 3 * d * f
        small = 2 * d
        embeddings = 2 * spec.vocab_size * d // tp  # untied LM head
    return DTYPE_BYTES * (spec.num_layers * (linears // tp + small) + embeddings)


def activation_bytes(spec: ModelSpec, tp: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """Peak transient memory of the largest step: one layer's intermediates for every batched token,
    plus float32 logits for every sampled row (what a profiling forward pass would see)."""
    d, f = spec.hidden_size, spec.intermediate_size // tp
    q_kv = (spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim) // tp
    per_token = d * 4 + q_kv + f * (3 if spec.arch == "llama" else 2)
    return DTYPE_BYTES * max_num_batched_tokens * per_token + 4 * max_num_seqs * spec.vocab_size // tp * 2


def block_bytes(spec: ModelSpec, tp: int, block_size: int) -> int:
    return block_size * spec.kv_elems_per_token(tp) * DTYPE_BYTES * spec.num_layers


def plan_memory(spec: ModelSpec, gpu: GpuSpec, tp: int, block_size: int = 16,
                max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                gpu_memory_utilization: float = 0.9, overhead: int = GiB // 2,
                sharded_hidden: bool = False) -> MemoryPlan:
    """sharded_hidden: the rank also holds the W_k, W_v column slices of sharded hidden attention."""
    usable = int(gpu.hbm_bytes * gpu_memory_utilization)
    weights = weight_bytes(spec, tp) + (sharded_hidden_extra_weights(spec, tp) if sharded_hidden else 0)
    acts = activation_bytes(spec, tp, max_num_batched_tokens, max_num_seqs)
    cache = usable - weights - acts - overhead
    per_block = block_bytes(spec, tp, block_size)
    if cache < per_block:
        raise ValueError(f"{spec.num_layers}-layer model does not fit on {gpu.name} x{tp}: "
                         f"weights {weights / GiB:.1f} GiB + activations {acts / GiB:.1f} GiB per rank "
                         f"leave no cache in {usable / GiB:.1f} GiB")
    return MemoryPlan(gpu.hbm_bytes, usable, weights, acts, overhead, cache, per_block, cache // per_block)
