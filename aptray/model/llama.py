"""The Llama family (RMSNorm, rotary, grouped-query attention, SwiGLU) on aptray's layers.

Module names mirror Hugging Face's LlamaForCausalLM; covers SmolLM2, Llama-2/3, Mistral-shaped models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptray.model.attention import HybridAttention
from aptray.model.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                                 fuse_columns)
from aptray.model.rotary import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaMLP(nn.Module):
    def __init__(self, d: int, ffn: int, bias: bool, dtype):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(d, ffn, bias, dtype)
        self.up_proj = ColumnParallelLinear(d, ffn, bias, dtype)
        self.down_proj = RowParallelLinear(ffn, d, bias, dtype)
        # one GEMM for gate and up; their parameters are row views of it (loaded by their names)
        self.gate_up_weight, self.gate_up_bias = fuse_columns(self.gate_proj, self.up_proj)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, rotary, dtype):
        super().__init__()
        d = cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
        self.self_attn = HybridAttention(d, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                                         getattr(cfg, "attention_bias", False), "o_proj", rotary, dtype)
        self.mlp = LlamaMLP(d, cfg.intermediate_size, getattr(cfg, "mlp_bias", False), dtype)
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)

    def forward(self, h, ctx, kv_cache, hidden_cache):
        h = h + self.self_attn(self.input_layernorm(h), ctx, kv_cache, hidden_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {cfg.hidden_act!r} is not supported")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope_params = getattr(cfg, "rope_parameters", None) or {}
        theta = rope_params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        scaling = getattr(cfg, "rope_scaling", None) or (rope_params if rope_params.get("rope_type") else None)
        rotary = RotaryEmbedding(head_dim, cfg.max_position_embeddings, theta, scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg, dtype=torch.float32):
        super().__init__()
        self.model = LlamaModel(cfg, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.tied_names = {}
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied_names = {"lm_head.weight": "model.embed_tokens.weight"}

    @property
    def layers(self):
        return self.model.layers

    def forward(self, input_ids, ctx, caches):
        h = self.model.embed_tokens(input_ids)
        for layer, (kv_cache, hidden_cache) in zip(self.model.layers, caches):
            h = layer(h, ctx, kv_cache, hidden_cache)
        return self.model.norm(h)

    def compute_logits(self, h):
        return self.lm_head.logits(h)
