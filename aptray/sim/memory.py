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
    stage: int = 0  # pipeline stage this rank belongs to
    num_layers: int = 0  # layers the stage holds


def sharded_hidden_extra_weights(spec: ModelSpec, tp: int, layers: int | None = None) -> int:
    """Bytes per rank of the W_k and W_v column slices (all heads, the rank's d/t inputs) that sharded
    hidden attention needs on top of the usual head-sharded weights (docs/ARCHITECTURE.md section 2: about
    +17% of the layer weights for MHA; the block of the slice that covers the rank's own heads is already
    there, so it is 1 - 1/t of that).
    layers: the rank's stage's layers (default all)."""
    if tp <= 1:
        return 0
    kv_out, d_in = 2 * spec.num_kv_heads * spec.head_dim, spec.hidden_size // tp
    return DTYPE_BYTES * (spec.num_layers if layers is None else layers) * (kv_out - kv_out // tp) * d_in


def weight_bytes(spec: ModelSpec, tp: int, pp: int = 1, stage: int = 0) -> int:
    """Parameters held by one rank of one pipeline stage (vocabulary and linears split over the stage's tp
    ranks; norms and biases replicated). The first stage holds the embeddings, the last the LM head: OPT
    ties it to the embedding, which a last stage of its own must then hold a copy of."""
    d, f, q = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim
    kv = 2 * spec.num_kv_heads * spec.head_dim
    layers = spec.layers_of_stages(pp)[stage]
    first, last = stage == 0, stage == pp - 1
    if spec.arch == "opt":
        linears = d * (q + kv) + q * d + 2 * d * f
        small = (q + kv) + d + f + d + 4 * d  # biases and two layernorms
        embeddings = (spec.vocab_size * d // tp + spec.max_model_len * d if first else 0) \
            + (spec.vocab_size * d // tp if last and not first else 0)
    else:
        linears = d * (q + kv) + q * d + 3 * d * f
        small = 2 * d
        embeddings = (2 * spec.vocab_size * d // tp if first and last  # untied LM head
                      else spec.vocab_size * d // tp if first or last else 0)
    return DTYPE_BYTES * (layers * (linears // tp + small) + embeddings)


def activation_bytes(spec: ModelSpec, tp: int, max_num_batched_tokens: int, max_num_seqs: int,
                     pp: int = 1, stage: int = 0) -> int:
    """Peak transient memory of the largest step: one layer's intermediates for every batched token,
    plus float32 logits for every sampled row on the last stage (what a profiling forward pass would
    see); with pp > 1, also a stage-boundary buffer of d per token for each micro-batch in flight."""
    d, f = spec.hidden_size, spec.intermediate_size // tp
    q_kv = (spec.num_heads * spec.head_dim + 2 * spec.num_kv_heads * spec.head_dim) // tp
    per_token = d * 4 + q_kv + f * (3 if spec.arch == "llama" else 2)
    logits = 4 * max_num_seqs * spec.vocab_size // tp * 2 if stage == pp - 1 else 0
    boundary = DTYPE_BYTES * pp * max_num_batched_tokens * d if pp > 1 else 0
    return DTYPE_BYTES * max_num_batched_tokens * per_token + logits + boundary


def block_bytes(spec: ModelSpec, tp: int, block_size: int, layers: int | None = None) -> int:
    """Bytes of one physical block on one rank: block_size tokens of KV for each of its stage's layers."""
    return block_size * spec.kv_elems_per_token(tp) * DTYPE_BYTES * (spec.num_layers if layers is None else layers)


def stage_memory(spec: ModelSpec, gpu: GpuSpec, tp: int, pp: int = 1, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                 gpu_memory_utilization: float = 0.9, overhead: int = GiB // 2,
                 sharded_hidden: bool = False) -> list[MemoryPlan]:
    """One rank's memory in each pipeline stage: its layers' weights, its activations, its own pool."""
    usable = int(gpu.hbm_bytes * gpu_memory_utilization)
    plans = []
    for stage, layers in enumerate(spec.layers_of_stages(pp)):
        weights = weight_bytes(spec, tp, pp, stage) + (
            sharded_hidden_extra_weights(spec, tp, layers) if sharded_hidden else 0)
        acts = activation_bytes(spec, tp, max_num_batched_tokens, max_num_seqs, pp, stage)
        cache = usable - weights - acts - overhead
        per_block = block_bytes(spec, tp, block_size, layers)
        if cache < per_block:
            where = f" (stage {stage} of {pp}, {layers} layers)" if pp > 1 else ""
            raise ValueError(f"{spec.num_layers}-layer model does not fit on {gpu.name} x{tp * pp}{where}: "
                             f"weights {weights / GiB:.1f} GiB + activations {acts / GiB:.1f} GiB per rank "
                             f"leave no cache in {usable / GiB:.1f} GiB")
        plans.append(MemoryPlan(gpu.hbm_bytes, usable, weights, acts, overhead, cache, per_block,
                                cache // per_block, stage, layers))
    return plans


def plan_memory(spec: ModelSpec, gpu: GpuSpec, tp: int, block_size: int = 16,
                max_num_batched_tokens: int = 2048, max_num_seqs: int = 256,
                gpu_memory_utilization: float = 0.9, overhead: int = GiB // 2,
                sharded_hidden: bool = False, pp: int = 1) -> MemoryPlan:
    """The pool every stage can hold: a block id names the same tokens on every stage (one block table
    per request), so the stage with the fewest blocks sets the count.
    sharded_hidden: the rank also holds the W_k, W_v column slices of sharded hidden attention."""
    plans = stage_memory(spec, gpu, tp, pp, block_size, max_num_batched_tokens, max_num_seqs,
                         gpu_memory_utilization, overhead, sharded_hidden)
    return min(plans, key=lambda p: p.num_blocks)
