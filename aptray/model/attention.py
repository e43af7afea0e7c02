"""Attention over the hybrid cache: each request reads only its own KV or hidden blocks.

KV requests store K and V; hidden requests store the attention input x (the QKV projection's
input) and rebuild attention from it by recompute (project K, V again) or, without rotary,
by absorbing W_k into the query (see aptray_kernels.reference.absorbed_decode_attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptray_kernels import ops

from aptray.model.layers import ColumnParallelLinear, RowParallelLinear, fuse_columns
from aptray.model.parallel import split
from aptray.model.rotary import RotaryEmbedding
from aptray.model.step_context import StepContext


def _chunks_within(lens: tuple[int, ...], budget: int) -> list[slice]:
    """Consecutive row ranges whose padded context (rows x longest) stays within budget tokens."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lens):
        longest_with = max(longest, n)
        if i > start and longest_with * (i - start + 1) > budget:
            out.append(slice(start, i))
            start, longest_with = i, n
        longest = longest_with
    out.append(slice(start, len(lens)))
    return out


class HybridAttention(nn.Module):
    scratch_tokens = 1 << 62  # set by the model runner from the config
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 out_name: str, rotary: RotaryEmbedding | None, dtype):
        super().__init__()
        self.num_heads = split(num_heads, "attention heads")
        self.num_kv_heads = split(num_kv_heads, "KV heads")
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.rotary = rotary
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * head_dim, bias, dtype)
        self.k_proj = ColumnParallelLinear(hidden_size, num_kv_heads * head_dim, bias, dtype)
        self.v_proj = ColumnParallelLinear(hidden_size, num_kv_heads * head_dim, bias, dtype)
        # one GEMM for Q, K and V; q/k/v_proj's parameters are row views of it (loaded by their names)
        self.qkv_weight, self.qkv_bias = fuse_columns(self.q_proj, self.k_proj, self.v_proj)
        self.out_name = out_name  # "out_proj" (OPT) or "o_proj" (Llama): the checkpoint's name
        setattr(self, out_name, RowParallelLinear(num_heads * head_dim, hidden_size, bias, dtype))

    def _rope(self):
        return (self.rotary.cos, self.rotary.sin) if self.rotary is not None else (None, None)

    def project_kv(self, x: torch.Tensor):
        """K, V for hidden vectors x [..., L, d] at positions 0..L-1."""
        return ops.project_kv(x, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
                              self.num_kv_heads, self.head_dim, *self._rope())

    def forward(self, x: torch.Tensor, ctx: StepContext, kv_cache: torch.Tensor, hidden_cache: torch.Tensor):
        t, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(t, heads + 2 * kv_heads, self.head_dim)
        v = qkv[:, heads + kv_heads:]
        if self.rotary is not None:  # q and k rotated together, with cos/sin taken once per step
            qk = ops.rotate(qkv[:, :heads + kv_heads], *self.rotary.step_cos_sin(ctx.positions, x.dtype, ctx.scratch))
            q, k = qk[:, :heads], qk[:, heads:]
        else:
            q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
        if ctx.all_kv:
            ops.write_kv(kv_cache, k, v, ctx.kv_slots)
        elif ctx.kv_rows.numel():
            ops.write_kv(kv_cache, k[ctx.kv_rows], v[ctx.kv_rows], ctx.kv_slots)
        if ctx.hidden_rows.numel():
            ops.write_hidden(hidden_cache, x[ctx.hidden_rows], ctx.hidden_slots)

        out = None
        for path, g in ctx.decodes.items():
            if g.all_rows:  # a pure decode step: the group's output is the whole output
                out = self._decode(path, q, g, kv_cache, hidden_cache, ctx.scratch)
                break
        else:
            out = torch.empty(t, heads, self.head_dim, dtype=q.dtype, device=q.device)
            for seq in ctx.prefills:
                out[seq.rows] = self._prefill(q[seq.rows], k[seq.rows], v[seq.rows], seq, kv_cache, hidden_cache)
            for path, g in ctx.decodes.items():
                out[g.rows] = self._decode(path, q[g.rows], g, kv_cache, hidden_cache, ctx.scratch)
        return getattr(self, self.out_name)(out.reshape(t, -1))

    def _prefill(self, q, k, v, seq, kv_cache, hidden_cache):
        """Causal attention of a chunk over its whole context (earlier chunks come from the cache)."""
        n, ctx_len = q.shape[0], seq.start_pos + q.shape[0]
        allowed = None
        if seq.start_pos > 0:
            table = seq.block_table[None]
            if seq.kind == "kv":
                k, v = (z[0] for z in ops.gather_kv(kv_cache, table, ctx_len))
            else:
                k, v = self.project_kv(ops.gather_hidden(hidden_cache, table, ctx_len)[0])
            allowed = (torch.arange(ctx_len, device=q.device)[None, :]
                       <= torch.arange(seq.start_pos, ctx_len, device=q.device)[:, None])
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).to(q.dtype),
                                           v.transpose(0, 1).to(q.dtype), attn_mask=allowed,
                                           is_causal=allowed is None and n > 1, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(0, 1)

    def _decode(self, path, q, g, kv_cache, hidden_cache, scratch):
        if path == "kv":
            return ops.paged_decode_attention(q, kv_cache, g.block_tables, g.context_lens, self.scale, scratch,
                                              max_len=g.max_len)
        if path == "absorbed":
            return ops.absorbed_decode_attention(q, hidden_cache, g.block_tables, g.context_lens,
                                                 self.k_proj.weight, self.v_proj.weight, self.v_proj.bias,
                                                 self.scale, scratch, max_len=g.max_len)
        # re-projected K and V are scratch: bounded by recompute_scratch_tokens per chunk of rows
        out = torch.empty_like(q)
        for rows in _chunks_within(g.lens, self.scratch_tokens):
            out[rows] = ops.recompute_decode_attention(q[rows], hidden_cache, g.block_tables[rows],
                                                       g.context_lens[rows], self.k_proj.weight, self.k_proj.bias,
                                                       self.v_proj.weight, self.v_proj.bias, self.scale,
                                                       *self._rope(), max_len=max(g.lens[rows]))
        return out

    def convert_hidden_to_kv(self, hidden_cache, kv_cache, src_table, dst_slots, num_tokens: int) -> None:
        """Project a request's stored hidden vectors into K, V in its new KV blocks."""
        x = ops.gather_hidden(hidden_cache, src_table[None], num_tokens)[0].clone()  # read before any write
        k, v = self.project_kv(x)
        ops.write_kv(kv_cache, k, v, dst_slots)
