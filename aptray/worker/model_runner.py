"""ModelRunner: one tensor-parallel rank's model shard and cache pool; runs BatchPlans."""
from __future__ import annotations

import logging
import time

import torch
from aptray_kernels.cpu_mirror import DecodeMirror

from aptray.cache.pool import CachePool
from aptray.config import EngineConfig
from aptray.model.loader import DTYPES, load_model
from aptray.model.sampler import sample, scored, token_logprobs
from aptray.model.step_context import _slots, build_step_context
from aptray.worker.memory_profile import gpu_cache_blocks
from aptray.plan import BatchPlan, StepResult

logger = logging.getLogger("aptray")
PROMPT_LOGITS_ROWS = 512  # prompt rows scored at once: their fp32 logits take 100 MB at a 50k vocabulary


class ModelRunner:
    """With world_size > 1 the caller has initialised torch.distributed (rank, world) already."""

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1, device: str | None = None):
        self.config = config
        self.rank = rank
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        spec = config.spec
        self.model = load_model(config.model_path, spec.arch, config.dtype, self.device, config.load_format)
        for layer in self.model.layers:
            layer.self_attn.scratch_tokens = config.recompute_scratch_tokens
        dtype = DTYPES[config.dtype]
        n_kv = spec.num_kv_heads // world_size
        if config.num_cache_blocks:
            self.num_blocks = config.num_cache_blocks
        elif self.device.type == "cuda":
            self.num_blocks = gpu_cache_blocks(self.model, config, n_kv, dtype, self.device)
        else:
            self.num_blocks = self._blocks_for_budget(n_kv, dtype)
        self.pool = CachePool(spec.num_layers, self.num_blocks, config.block_size, n_kv, spec.head_dim,
                              spec.hidden_size, config.hidden_block_size, dtype, self.device)
        # CPU: KV and absorbed hidden decode reuse last step's gathered rows (aptray_kernels.cpu_mirror),
        # each within as many bytes again as the pool holds (the decode rows of both kinds share the pool)
        self.kv_mirror = self.hidden_mirror = None
        if self.device.type == "cpu":
            pool_bytes = self.num_blocks * CachePool.bytes_per_block(spec.num_layers, config.block_size, n_kv,
                                                                     spec.head_dim, dtype)
            self.kv_mirror = DecodeMirror(spec.num_layers, pool_bytes, planes=2)
            if config.hidden_block_size and config.hidden_attention == "absorbed":
                self.hidden_mirror = DecodeMirror(spec.num_layers, pool_bytes, planes=1)
        logger.info("rank %d: %d cache blocks of %d KV tokens (%d hidden tokens)", rank, self.num_blocks,
                    config.block_size, config.hidden_block_size)

    def _blocks_for_budget(self, n_kv: int, dtype) -> int:
        per_block = CachePool.bytes_per_block(self.config.spec.num_layers, self.config.block_size, n_kv,
                                              self.config.spec.head_dim, dtype)
        return max(1, int(self.config.cache_memory_gb * 2**30) // per_block)

    @torch.inference_mode()
    def execute(self, plan: BatchPlan) -> StepResult:
        start = time.perf_counter()
        for conv in plan.conversions:
            self._convert(conv)
        result = StepResult()
        for kind, mirror in (("kv", self.kv_mirror), ("hidden", self.hidden_mirror)):
            if mirror is not None:  # every step, so that it sees every change of the decode set
                mirror.begin_step([(s.request_id, s.context_len, s.block_table) for s in plan.seqs
                                   if s.is_decode and s.cache_kind == kind])
        if plan.seqs:
            ids, ctx = build_step_context(plan, self.config.block_size, self.config.hidden_block_size,
                                          self.config.hidden_attention, self.device)
            ctx.scratch["kv_mirror"], ctx.scratch["hidden_mirror"] = self.kv_mirror, self.hidden_mirror
            h = self.model(ids, ctx, self.pool.layers())
            logits = self.model.compute_logits(h[ctx.sample_rows]).float()
            sampled = [s for s in plan.seqs if s.sample]
            if self.rank == 0 and sampled:
                tokens, errors, own = sample(logits, sampled, self.generator)
                logprobs, lp_errors = token_logprobs(logits, sampled, tokens)
                for row, why in lp_errors.items():
                    tokens[row], errors[row] = None, why
                result.logprobs = {sampled[row].request_id: lp for row, lp in logprobs.items()}
                result.sampled = {s.request_id: t for s, t in zip(sampled, tokens) if t is not None}
                result.errors = {sampled[row].request_id: why for row, why in errors.items()}
                result.client_errors = {sampled[row].request_id for row in own if row not in lp_errors}
                if plan.want_logits:
                    result.logits = {s.request_id: logits[i].cpu() for i, s in enumerate(sampled)}
            if any(s.prompt_targets for s in plan.seqs):
                result.prompt_logprobs = self._prompt_logprobs(plan, h)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.step_time = time.perf_counter() - start
        return result

    def _prompt_logprobs(self, plan: BatchPlan, h: torch.Tensor) -> dict:
        """Each asking seq's prompt targets scored by the rows before them (every rank computes the
        logits, a collective at TP > 1; rank 0 answers)."""
        out, row0 = {}, 0
        for s in plan.seqs:
            m = len(s.prompt_targets)
            entries = []
            for a in range(0, m, PROMPT_LOGITS_ROWS):
                b = min(m, a + PROMPT_LOGITS_ROWS)
                logits = self.model.compute_logits(h[row0 + a:row0 + b]).float()
                if self.rank == 0:
                    entries += scored(logits, s.prompt_targets[a:b], [s.prompt_logprobs] * (b - a))
            if m and self.rank == 0:
                out[s.request_id] = (s.start_pos + 1, entries)
            row0 += len(s.token_ids)
        return out

    def _convert(self, conv) -> None:
        if conv.to_kind != "kv":
            raise ValueError("only hidden -> KV conversion runs on shards; KV -> hidden is a re-prefill")
        src = torch.tensor(conv.src_blocks, device=self.device)
        dst = torch.tensor(_slots(conv.dst_blocks, 0, conv.num_tokens, self.config.block_size), device=self.device)
        for layer, (kv_cache, hidden_cache) in zip(self.model.layers, self.pool.layers()):
            layer.self_attn.convert_hidden_to_kv(hidden_cache, kv_cache, src, dst, conv.num_tokens)
