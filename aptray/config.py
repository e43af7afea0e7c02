"""Engine configuration and model geometry (torch-free)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

logger = logging.getLogger("aptray")

CACHE_MODES = ("kv", "hidden", "hybrid")
HIDDEN_ATTENTION = ("absorbed", "recompute")
SCHEDULERS = ("fcfs", "sarathi", "apt")


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

    def hidden_ratio(self, tp: int = 1) -> float:
        """r = hidden bytes / KV bytes per token per rank; the hidden cache pays off only when r < 1."""
        return self.hidden_elems_per_token(tp) / self.kv_elems_per_token(tp)


@dataclass
class EngineConfig:
    model: str  # a local Hugging Face folder, or the demo model's name (aptray.model.demo)
    tokenizer: str | None = None
    dtype: str = "float32"
    seed: int = 0
    tensor_parallel_size: int = 1
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
        from aptray.model.demo import resolve_model_path
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
        self.tokenizer = self.tokenizer or self.model_path
        self.spec = ModelSpec.from_path(self.model_path)
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(self.spec.max_model_len, self.max_num_seqs)
        if self.recompute_scratch_tokens is None:
            self.recompute_scratch_tokens = max(self.max_num_batched_tokens, 4 * self.spec.max_model_len)
        if self.hidden_attention == "absorbed" and self.spec.rotary:
            logger.info("absorbed hidden attention is exact only without rotary positions: using recompute")
            self.hidden_attention = "recompute"
        r = self.spec.hidden_ratio(self.tensor_parallel_size)
        if r < 1:
            self.hidden_block_size = int(self.block_size / r)
        elif self.cache_mode != "kv":
            logger.warning("hidden cache disabled: it needs %.2fx the memory of KV per token (r = %.2f >= 1, "
                           "GQA/MQA or tensor parallel); serving with cache_mode='kv'", r, r)
            self.cache_mode = "kv"
