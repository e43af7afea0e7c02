"""Step time of one batch: fitted GEMM/elementwise/all-reduce laws per layer plus an attention roofline.

Per layer and tensor-parallel rank (d width, H heads, D head dim, kv = 2*n_kv*D/t, F ffn, t ranks):
  GEMMs at m = tokens in the step: QKV (d x (H*D + kv)/t... as (d, 3d/t) for MHA), out (H*D/t, d),
  up (d, F/t, x2 when gated), down (F/t, d); two layernorms, the activation, two residual adds;
  two all-reduces of m*d elements when t > 1.
  Attention, priced as a roofline on summed FLOPs and HBM bytes (one kernel for prefills, one
  for decodes):
    prefill chunk of q tokens at context c:  4*q*(c - (q-1)/2)*H/t*D FLOPs, q*(H*D/t + kv)*2 B written/read;
    KV decode:          4*c*H/t*D FLOPs, c*kv*2 B read;
    hidden, absorbed:   4*H/t*d*c FLOPs, c*d*2 B read, plus per request u_h = W_k,h^T q_h and
                        W_v,h y_h (two GEMMs of m = hidden decodes, k = d, n = H*D/t);
    hidden, recompute:  a GEMM re-projecting K,V for the whole context (m = c, k = d, n = kv),
                        c*d*2 B read, then KV attention over the scratch (c*kv*2 B written and read).
Once per step: LM head GEMM for the sampled rows (m = sampled, k = d, n = vocab/t), and a fixed
CPU overhead (scheduling, sampling, launch) that the step pays regardless of size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from aptray.config import ModelSpec
from aptray.sim.fit import HardwareFit

DTYPE_BYTES = 2  # fp16 weights, activations and cache


class SeqWork(NamedTuple):
    cache_kind: str  # "kv" or "hidden"
    num_tokens: int  # tokens computed this step
    context_len: int  # tokens attended to, the new ones included
    sample: bool = True


@dataclass
class CostModel:
    spec: ModelSpec
    hw: HardwareFit
    tp: int = 1
    hidden_attention: str = "absorbed"  # or "recompute"
    step_overhead: float = 1e-3  # seconds per step outside the GPU kernels
    _dense_by_m: dict = field(default_factory=dict, init=False, repr=False)  # memo: steps repeat token counts
    _head_by_n: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        s, t = self.spec, self.tp
        self._d = s.hidden_size
        self._q_width = s.num_heads * s.head_dim // t  # query/output width per rank
        self._kv = s.kv_elems_per_token(t)
        self._heads = s.num_heads // t
        self._ffn = s.intermediate_size // t
        self._up_n = self._ffn * (2 if s.arch == "llama" else 1)  # llama's gate and up are one GEMM

    # -- pieces --------------------------------------------------------------------------------
    def gemm(self, m: float, k: int, n: int) -> float:
        if m <= 0:
            return 0.0
        return self.hw.gemm.time(2.0 * m * k * n, DTYPE_BYTES * (k * n + m * k + m * n))

    def dense_layer(self, m: int) -> float:
        """Everything of one layer but attention's core, for m tokens."""
        d, b = self._d, DTYPE_BYTES
        t = (self.gemm(m, d, self._q_width + self._kv) + self.gemm(m, self._q_width, d)
             + self.gemm(m, d, self._up_n) + self.gemm(m, self._ffn, d))
        t += 2 * self.hw.layernorm.time(0, 2 * b * m * d)
        t += self.hw.activation.time(0, b * m * (self._up_n + self._ffn))
        t += 2 * self.hw.residual_add.time(0, 3 * b * m * d)
        t += 2 * self.hw.all_reduce_time(m * d, self.tp)
        return t

    def attention_layer(self, seqs: list[SeqWork]) -> float:
        d, kv, qw, heads, b = self._d, self._kv, self._q_width, self._heads, DTYPE_BYTES
        head_dim = self.spec.head_dim
        pf_flops = pf_bytes = dec_flops = dec_bytes = 0.0
        absorbed_reqs = 0
        recompute_ctx = 0
        absorbed = self.hidden_attention == "absorbed"
        for kind, q, c, _ in seqs:
            if q > 1 or c == q:  # prefill (or chunk): K,V computed as usual for the new tokens
                pf_flops += 4.0 * q * (c - (q - 1) / 2.0) * heads * head_dim
                pf_bytes += b * (q * (2 * qw + kv) + (c - q) * kv)
                if kind == "hidden":
                    pf_bytes += b * q * d  # store the layer inputs
                    recompute_ctx += c - q  # a cached hidden prefix must be re-projected
            elif kind == "kv":
                dec_flops += 4.0 * c * heads * head_dim
                dec_bytes += b * c * kv
            elif absorbed:
                dec_flops += 4.0 * heads * d * c
                dec_bytes += b * c * d
                absorbed_reqs += 1
            else:  # hidden, recompute
                dec_flops += 4.0 * c * heads * head_dim
                dec_bytes += b * (c * d + 2 * c * kv)
                recompute_ctx += c
        t = 0.0
        if pf_flops:
            t += self.hw.attention.time(pf_flops, pf_bytes)
        if dec_flops:
            t += self.hw.attention.time(dec_flops, dec_bytes)
        if absorbed_reqs:
            t += 2 * self.gemm(absorbed_reqs, d, qw)
        if recompute_ctx:
            t += self.gemm(recompute_ctx, d, kv)
        return t

    def conversion_layer(self, to_kind: str, num_tokens: int) -> float:
        """hidden -> KV: one projection of the stored inputs; KV -> hidden: a re-prefill of the tokens."""
        if to_kind == "kv":
            return self.gemm(num_tokens, self._d, self._kv)
        return self.dense_layer(num_tokens)

    # -- a whole step --------------------------------------------------------------------------
    def step_time(self, seqs: list[SeqWork], conversions: list[tuple[str, int]] = ()) -> float:
        """seqs: SeqWork or plain (cache_kind, num_tokens, context_len, sample) tuples."""
        if not seqs and not conversions:
            return 0.0
        m = sampled = 0
        for s in seqs:
            m += s[1]
            sampled += s[3]
        per_layer = self.attention_layer(seqs) if seqs else 0.0
        dense = self._dense_by_m.get(m)
        if dense is None:
            dense = self._dense_by_m[m] = self.dense_layer(m) if m else 0.0
        per_layer += dense + sum(self.conversion_layer(kind, n) for kind, n in conversions)
        once = self._head_by_n.get((m, sampled))
        if once is None:
            v, t = self.spec.vocab_size // self.tp, self.tp
            once = self._head_by_n[(m, sampled)] = (
                self.gemm(sampled, self._d, v) + self.hw.all_reduce_time(sampled * v, t)  # LM head, logits gather
                + self.hw.residual_add.time(0, DTYPE_BYTES * m * self._d))  # embedding lookup
        return self.step_overhead + self.spec.num_layers * per_layer + once
