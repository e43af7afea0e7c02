"""Engine configuration and model geometry (torch-free)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from aptray.model.demo import resolve_model_path

logger = logging.getLogger("aptray")

CACHE_MODES = ("kv", "hidden", "hybrid", "auto")  # auto: hybrid where the hidden cache pays, else kv
HIDDEN_ATTENTION = ("absorbed", "recompute")
SCHEDULERS = ("fcfs", "sarathi", "apt", "vllm")


@dataclass(frozen=True)
class ModelSpec:
    """What the cache and scheduler need to know of a model, read from its HF config.json."""
    arch: str  # "opt" or "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    rotary: bool
    intermediate_size: int

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelSpec":
        model_type = cfg.get("model_type")
        heads = cfg["num_attention_heads"]
        if model_type == "opt":
            if cfg.get("word_embed_proj_dim", cfg["hidden_size"]) != cfg["hidden_size"]:
                raise ValueError("OPT models with project_in/out (OPT-350m) are not supported")
            return cls("opt", cfg["hidden_size"], cfg["num_hidden_layers"], heads, heads,
                       cfg["hidden_size"] // heads, cfg["vocab_size"], cfg["max_position_embeddings"],
                       False, cfg["ffn_dim"])
        if model_type in ("llama", "mistral", "qwen2"):
            return cls("llama", cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                       cfg.get("num_key_value_heads") or heads,
                       cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["vocab_size"],
                       cfg["max_position_embeddings"], True, cfg["intermediate_size"])
        raise ValueError(f"unsupported model_type {model_type!r}: aptray serves opt and llama-family models")

    @classmethod
    def from_path(cls, path: str) -> "ModelSpec":
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf(json.load(f))

    def kv_elems_per_token(self, tp: int = 1) -> int:
        """K and V elements per token per layer on one tensor-parallel rank."""
        return 2 * self.num_kv_heads * self.head_dim // tp

    def hidden_elems_per_token(self, tp: int = 1) -> int:
        """Hidden-cache elements per token per layer on one rank (replicated: the full width)."""
        return self.hidden_size

    def hidden_ratio(self, tp: int = 1, pp: int = 1) -> float:
        """r = hidden bytes / KV bytes per token per rank; the hidden cache pays off only when r < 1.
        pp pipeline stages leave it unchanged: a stage holds whole layers, so both caches shrink to its
        layers alike (d against 2*n_kv*D/tp per token per layer), unlike tp, which shards K and V only."""
        if pp < 1:
            raise ValueError("pipeline_parallel_size must be >= 1")
        return self.hidden_elems_per_token(tp) / self.kv_elems_per_token(tp)

    def layers_of_stages(self, pp: int) -> list[int]:
        """Layers per pipeline stage: L // pp each, the remainder on the last stage (vLLM's split)."""
        if not 1 <= pp <= self.num_layers:
            raise ValueError(f"pipeline_parallel_size must be in [1, {self.num_layers}], got {pp}")
        per = self.num_layers // pp
        return [per] * (pp - 1) + [self.num_layers - per * (pp - 1)]


@dataclass
class EngineConfig:
    model: str  # a local Hugging Face folder, or the demo model's name (aptray.model.demo)
    tokenizer: str | None = None
    dtype: str = "float32"
    seed: int = 0
    tensor_parallel_size: int = 1
    # stages holding consecutive layers, tensor_parallel_size ranks each; only the simulator runs
    # pp > 1 (aptray.sim.pipeline): the serving engine refuses it (aptray.llm)
    pipeline_parallel_size: int = 1
    load_format: str = "auto"  # "dummy": random weights of the right shapes (benchmarks of big models)
    skip_tokenizer_init: bool = False  # prompts come as token ids; no tokenizer files needed
    # cache
    cache_mode: str = "kv"
    hidden_attention: str = "absorbed"
    block_size: int = 16
    num_cache_blocks: int | None = None  # None: size the pool from cache_memory_gb
    cache_memory_gb: float = 0.5  # CPU: the pool's size; GPU: gpu_memory_utilization decides
    gpu_memory_utilization: float = 0.9
    recompute_scratch_tokens: int | None = None  # context tokens re-projected at once (hidden recompute)
    # share the cache of full blocks whose tokens, and all before them, another request computed
    # (vLLM's name; aptray.cache.block_manager). Exact: a cached block is reused only at its position
    enable_prefix_caching: bool = True
    # scheduling
    scheduler: str = "fcfs"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: the model context (a whole prompt fits one step)
    enable_chunked_prefill: bool = False
    iteration_shape: str = "mixed"  # apt: "mixed" (chunked prefill under a TBT-sized budget) or "alternate" (the paper)
    ttft_slo: float = 1.0  # seconds, defaults for requests that set none
    tbt_slo: float = 1.0
    spec: ModelSpec = field(init=False)
    hidden_block_size: int = field(init=False, default=0)
    model_path: str = field(init=False, default="")  # the folder `model` names

    def slos_of(self, sampling) -> tuple[float, float]:
        """(TTFT, TBT) SLOs of a request: its own, else this engine's defaults."""
        return sampling.ttft_slo or self.ttft_slo, sampling.tbt_slo or self.tbt_slo

    def __post_init__(self) -> None:
        self.model_path = resolve_model_path(self.model)
        if not os.path.isdir(self.model_path) or not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise FileNotFoundError(f"model path {self.model!r} is not a folder with a config.json")
        for name, allowed in (("cache_mode", CACHE_MODES), ("hidden_attention", HIDDEN_ATTENTION),
                              ("scheduler", SCHEDULERS), ("iteration_shape", ("alternate", "mixed")),
                              ("load_format", ("auto", "dummy"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        for name in ("skip_tokenizer_init", "enable_prefix_caching", "enable_chunked_prefill"):
            if not isinstance(getattr(self, name), bool):  # the string "False" would read as on
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.tokenizer = self.tokenizer or self.model_path
        self.spec = ModelSpec.from_path(self.model_path)
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(self.spec.max_model_len, self.max_num_seqs)
        if self.recompute_scratch_tokens is None:
            self.recompute_scratch_tokens = max(self.max_num_batched_tokens, 4 * self.spec.max_model_len)
        if self.hidden_attention == "absorbed" and self.spec.rotary:
            logger.info("absorbed hidden attention is exact only without rotary positions: using recompute")
            self.hidden_attention = "recompute"
        self.spec.layers_of_stages(self.pipeline_parallel_size)  # validates it
        if self.scheduler == "vllm" and self.cache_mode not in ("kv", "auto"):
            raise ValueError(f"scheduler 'vllm' keeps K and V only, as vLLM does: cache_mode={self.cache_mode!r} "
                             "cannot be served by it; use cache_mode='kv' (or 'auto')")
        r = self.spec.hidden_ratio(self.tensor_parallel_size, self.pipeline_parallel_size)
        if self.scheduler == "vllm":
            self.cache_mode = "kv"
        if r < 1:
            self.hidden_block_size = int(self.block_size / r)
        if self.cache_mode == "auto":
            self.cache_mode = "hybrid" if r < 1 else "kv"
            if r >= 1:
                logger.info("cache_mode auto: kv (%s)", self._why_hidden_cannot_pay(r))
        elif self.cache_mode != "kv" and r >= 1:  # a config that names the hidden cache gets it, or an error
            raise ValueError(f"cache_mode={self.cache_mode!r} cannot pay here: {self._why_hidden_cannot_pay(r)}. "
                             f"Use cache_mode='kv' (or 'auto', which picks the hidden cache where it pays)"
                             + ("" if self.spec.num_kv_heads < self.spec.num_heads else
                                ", or tensor_parallel_size=1, where a hidden vector is half of K and V"))

    def _why_hidden_cannot_pay(self, r: float) -> str:
        s, tp = self.spec, self.tensor_parallel_size
        where = (f"{s.num_kv_heads} KV heads for {s.num_heads} query heads (grouped-query attention)"
                 if s.num_kv_heads < s.num_heads else f"tensor_parallel_size={tp} shards K and V but not the hidden vector")
        return (f"a hidden vector takes {r:.2f}x the memory of K and V per token per rank "
                f"(r = d / (2 n_kv D / tp) = {s.hidden_size} / {s.kv_elems_per_token(tp)}; {where})")
