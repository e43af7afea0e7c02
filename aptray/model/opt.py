"""OPT (multi-head attention, learned positions, biases, pre-LN) on aptray's layers.

Module names mirror Hugging Face's OPTForCausalLM so checkpoint names map one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptray.model.attention import HybridAttention
from aptray.model.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

POSITION_OFFSET = 2  # OPT's learned position table starts two rows in


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        d = cfg.hidden_size
        heads = cfg.num_attention_heads
        self.self_attn = HybridAttention(d, heads, heads, d // heads, cfg.enable_bias, "out_proj", None, dtype)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=cfg.layer_norm_elementwise_affine, dtype=dtype)
        self.fc1 = ColumnParallelLinear(d, cfg.ffn_dim, cfg.enable_bias, dtype)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, d, cfg.enable_bias, dtype)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=cfg.layer_norm_elementwise_affine, dtype=dtype)
        if cfg.activation_function != "relu":
            raise ValueError(f"OPT activation {cfg.activation_function!r} is not supported")

    def forward(self, h, ctx, kv_cache, hidden_cache):
        h = h + self.self_attn(self.self_attn_layer_norm(h), ctx, kv_cache, hidden_cache)
        return h + self.fc2(F.relu(self.fc1(self.final_layer_norm(h))))


class OPTDecoder(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        if not cfg.do_layer_norm_before:
            raise ValueError("post-LN OPT (OPT-350m) is not supported")
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                            dtype=dtype)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine,
                                             dtype=dtype)


class OPTModel(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        self.decoder = OPTDecoder(cfg, dtype)


class OPTForCausalLM(nn.Module):
    tied_names = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, cfg, dtype=torch.float32):
        super().__init__()
        self.model = OPTModel(cfg, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype)
        self.lm_head.weight = self.model.decoder.embed_tokens.weight  # OPT ties them

    @property
    def layers(self):
        return self.model.decoder.layers

    def forward(self, input_ids, ctx, caches):
        dec = self.model.decoder
        h = dec.embed_tokens(input_ids) + dec.embed_positions(ctx.positions + POSITION_OFFSET)
        for layer, (kv_cache, hidden_cache) in zip(dec.layers, caches):
            h = layer(h, ctx, kv_cache, hidden_cache)
        return dec.final_layer_norm(h)

    def compute_logits(self, h):
        return self.lm_head.logits(h)
