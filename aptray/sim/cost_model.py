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

from dataclasses import dataclass

from aptray.config import ModelSpec
from aptray.sim.fit import HardwareFit

DTYPE_BYTES = 2  # fp16 weights, activations and cache


@dataclass(frozen=True)
class SeqWork:
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
        for s in seqs:
            q, c = s.num_tokens, s.context_len
            if q > 1 or c == q:  # prefill (or chunk): K,V computed as usual for the new tokens
                pf_flops += 4.0 * q * (c - (q - 1) / 2.0) * heads * head_dim
                pf_bytes += b * (q * (2 * qw + kv) + (c - q) * kv)
                if s.cache_kind == "hidden":
                    pf_bytes += b * q * d  # store the layer inputs
                    recompute_ctx += c - q  # a cached hidden prefix must be re-projected
            elif s.cache_kind == "hidden" and self.hidden_attention == "absorbed":
                dec_flops += 4.0 * heads * d * c
                dec_bytes += b * c * d
                absorbed_reqs += 1
            elif s.cache_kind == "hidden":  # recompute
                dec_flops += 4.0 * c * heads * head_dim
                dec_bytes += b * (c * d + 2 * c * kv)
                recompute_ctx += c
            else:
                dec_flops += 4.0 * c * heads * head_dim
                dec_bytes += b * c * kv
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
        return self.dense_layer(num_tokens) / 1.0

    # -- a whole step --------------------------------------------------------------------------
    def step_time(self, seqs: list[SeqWork], conversions: list[tuple[str, int]] = ()) -> float:
        if not seqs and not conversions:
            return 0.0
        m = sum(s.num_tokens for s in seqs)
        per_layer = self.dense_layer(m) + self.attention_layer(seqs) if seqs else 0.0
        per_layer += sum(self.conversion_layer(kind, n) for kind, n in conversions)
        sampled = sum(1 for s in seqs if s.sample)
        head = self.gemm(sampled, self._d, self.spec.vocab_size // self.tp)
        head += self.hw.all_reduce_time(sampled * self.spec.vocab_size / self.tp, self.tp)  # logits gather
        embed = self.hw.residual_add.time(0, DTYPE_BYTES * m * self._d)
        return self.step_overhead + self.spec.num_layers * per_layer + head + embed
