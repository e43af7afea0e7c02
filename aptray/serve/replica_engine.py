"""The engine a router runs: its model, its EngineConfig (from AppArgs) and its executor.

With one rank (tensor_parallel_size = 1, executor "auto" or "local") the model runs in the
router's own engine thread (LocalExecutor): no shard process and no gRPC round trip per step.
With several ranks (or executor "ray") ShardWorker actors in a STRICT_PACK placement group run it,
and every step's BatchPlan goes to them over gRPC (RayExecutor).
"""
from __future__ import annotations

import time

from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.serve.args import AppArgs

CPUS_PER_RANK = 1.0  # Ray CPUs a rank holds (shard actor, or the router when the model runs in it)


def resolve_model(args: AppArgs) -> tuple[str, bool]:
    """(model path, whether it is the embedded tiny default)."""
    if args.model:
        return args.model, False
    from aptray.worker.shard import default_model_path, ensure_tiny_model
    return ensure_tiny_model(default_model_path()), True


def engine_config(args: AppArgs, model: str) -> EngineConfig:
    return EngineConfig(model=model, tokenizer=args.tokenizer, dtype=args.dtype,
                        tensor_parallel_size=args.tensor_parallel_size, cache_mode=args.cache_mode,
                        block_size=args.block_size, num_cache_blocks=args.num_cache_blocks,
                        cache_memory_gb=args.cache_memory_gb, scheduler=args.scheduler,
                        max_num_seqs=args.max_num_seqs, ttft_slo=args.ttft_slo_ms / 1000,
                        tbt_slo=args.tbt_slo_ms / 1000)


def uses_shard_actors(args: AppArgs) -> bool:
    """False: the model runs in the router process (LocalExecutor)."""
    return args.executor == "ray" or args.tensor_parallel_size > 1


def gpus_available(tensor_parallel_size: int) -> bool:
    import ray
    return ray.cluster_resources().get("GPU", 0) >= tensor_parallel_size


def router_actor_options(args: AppArgs, use_gpu: bool) -> dict:
    """Ray resources of the router: none of its own while shards do the work (it mostly waits on
    them); what one shard would take when the model runs in it."""
    if uses_shard_actors(args):
        return {"num_cpus": 0}
    return {"num_cpus": CPUS_PER_RANK, "num_gpus": 1 if use_gpu else 0}


def build_engine(config: EngineConfig, args: AppArgs, tokenizer, owner: str, model_is_default: bool) -> Engine:
    """The router's engine (also what loadgen.bench_http_vs_engine runs in-process, to compare alike)."""
    if uses_shard_actors(args):
        from aptray.executor.ray import RayExecutor
        executor = RayExecutor(config, args.use_gpu, model_is_default=model_is_default,
                               cpus_per_shard=CPUS_PER_RANK, pg_name=f"aptray-shards-{owner}")
    else:
        import torch

        from aptray.executor.local import LocalExecutor
        if not torch.cuda.is_available():
            # as a shard rank does: one BLAS thread per CPU the rank holds (oversubscribed cores ran 10x slower)
            torch.set_num_threads(max(1, int(CPUS_PER_RANK)))
        executor = LocalExecutor(config)
    return Engine(config, executor, tokenizer)


class SchedulerTimer:
    """The engine has no hook for scheduler time: wraps the policy's schedule() to measure it."""

    def __init__(self, engine: Engine):
        self.last_s: float | None = None
        sched = engine.scheduler
        inner = sched.schedule

        def timed(now):
            t = time.perf_counter()
            plan = inner(now)
            self.last_s = time.perf_counter() - t
            return plan
        sched.schedule = timed
