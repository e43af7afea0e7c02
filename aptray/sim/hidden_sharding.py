"""The sharded hidden cache in the simulator: a TP >= 2 config that stores d/t of each hidden vector per rank."""
from __future__ import annotations

from aptray.config import EngineConfig


def shard_hidden(config: EngineConfig, cache_mode: str = "hybrid") -> EngineConfig:
    """Turn on the sharded hidden cache (docs/ARCHITECTURE.md section 2) for a TP >= 2 config (simulator only).

    With t ranks each stores d/t of every hidden vector, so r per rank is d/t / (2*n_kv*D/t), the same as
    at t = 1, where the replicated vector (r per rank = d / (2*n_kv*D/t)) made the engine turn hidden off.
    The simulator prices the sharded attention and its collectives (CostModel.hidden_sharded) and the
    extra W_k, W_v column slices (memory.sharded_hidden_extra_weights). The engine's kernels for it exist
    (aptray/model/sharded_hidden.py) but the serving engine does not use them.
    """
    spec, tp = config.spec, config.tensor_parallel_size
    if tp < 2 or cache_mode == "kv":
        return config
    r = spec.hidden_size / tp / spec.kv_elems_per_token(tp)
    if r >= 1:  # GQA/MQA: even sharded, hidden costs more than KV
        return config
    config.cache_mode = cache_mode
    config.hidden_block_size = int(config.block_size / r)
    return config


def hidden_is_sharded(config: EngineConfig) -> bool:
    """Hidden cache on at TP >= 2: only shard_hidden does that, the replicated form is always off there."""
    return config.tensor_parallel_size > 1 and config.cache_mode != "kv" and config.hidden_block_size > 0
