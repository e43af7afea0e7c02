"""Step time of one batch: fitted GEMM/elementwise/all-reduce laws per layer plus an attention roofline.

Per layer and tensor-parallel rank (d width, H heads, D head dim, kv = 2*n_kv*D/t, F ffn, t ranks):
  GEMMs at m = tokens in the step: QKV (d, (H*D)/t + kv), out (H*D/t, d), up (d, F/t, x2 when gated),
  down (F/t, d); two layernorms, the activation, two residual adds; two all-reduces of m*d
  elements when t > 1.
  Attention, priced as a roofline on summed FLOPs and HBM bytes: one kernel per prefill sequence
  (the engine attends each prefill on its own), one for all decodes:
    prefill chunk of q tokens at context c:  4*q*(c - (q-1)/2)*H/t*D FLOPs, q*(2*H*D/t + kv)*2 B
                        plus the cached prefix (c-q)*kv*2 B;
    KV decode:          4*c*H/t*D FLOPs, c*kv*2 B read;
    hidden, absorbed:   4*H/t*d*c FLOPs, c*d*2 B read, plus per step u_h = W_k,h^T q_h and
                        W_v,h y_h (two GEMMs of m = hidden decodes, k = d, n = H*D/t) and
                        hw.hidden_layer_overhead (the path's other launches; 0 in the vidur fits);
    hidden, recompute:  a GEMM re-projecting K,V for the whole context (m = c, k = d, n = kv),
                        c*d*2 B read, then KV attention over the scratch (c*kv*2 B written and read).
  A hidden prefill chunk with a cached prefix re-projects the prefix's K,V (GEMM m = c-q, (d, kv)):
  that is what the engine's prefill path does (aptray/model/attention.py).
  Sharded hidden (t >= 2, docs/ARCHITECTURE.md section 2): each rank stores d/t of x; absorbed attention computes
  partial scores for ALL heads over its slice (the same FLOPs per rank as H/t heads over d), reads
  c*d/t*2 B, and communicates per layer: an all-gather of q (N*H*D), an all-reduce of the scores
  (H*sum(c)) and one of the outputs (N*H*D). Re-projecting K,V (recompute, prefix, conversion) is a
  partial GEMM over the slice for all heads, (k = d/t, n = 2*n_kv*D), and an all-reduce of the K,V.
Once per step: LM head GEMM for the sampled rows (m = sampled, k = d, n = vocab/t), a logits
gather, the embedding read, a fixed host overhead (scheduling, sampling, launches) and a host
overhead per sequence in the step (0 for the GPU fits; fitted by the CPU calibration).
Pipeline stages (plan_stages): a stage is its layers x the same per-layer time, the embedding on the
first, the LM head and logits gather on the last; the host overhead is the host's, once per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from aptray.config import ModelSpec
from aptray.request import CacheKind
from aptray.sim.fit import HardwareFit

DTYPE_BYTES = 2  # fp16 weights, activations and cache


class StageWork(NamedTuple):
    host: float  # seconds of the host (scheduling, sampling, launches) before the first stage starts
    stages: list[float]  # seconds each pipeline stage computes
    tokens: int  # tokens in the step: the activations that cross each stage boundary
    sampled: int  # rows sampled on the last stage: the token ids sent back to the host


class SeqWork(NamedTuple):
    cache_kind: CacheKind  # or its value
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
    seq_overhead: float = 0.0  # seconds per sequence in the step outside the kernels (host Python)
    hidden_sharded: bool = False  # hidden stored as d/t per rank (t >= 2), docs/ARCHITECTURE.md section 2
    ragged_overhead: float = 0.0  # seconds per step whose KV decodes have unequal contexts (CPU: a mask)
    _dense_by_m: dict = field(default_factory=dict, init=False, repr=False)  # memo: steps repeat token counts
    _head_by_n: dict = field(default_factory=dict, init=False, repr=False)
    _gemm_memo: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        s, t = self.spec, self.tp
        self._d = s.hidden_size
        self._q_width = s.num_heads * s.head_dim // t  # query/output width per rank
        self._kv = s.kv_elems_per_token(t)
        self._heads = s.num_heads // t
        self._ffn = s.intermediate_size // t
        self._up_n = self._ffn * (2 if s.arch == "llama" else 1)  # llama's gate and up are one GEMM
        self._sharded = self.hidden_sharded and t > 1
        self._hid = self._d // t if self._sharded else self._d  # hidden elements per token per rank
        # re-projection of K,V from stored hidden vectors: (k, n) of its GEMM per rank
        self._reproj_kn = (self._hid, s.kv_elems_per_token(1)) if self._sharded else (self._d, self._kv)
        self._absorbed = self.hidden_attention == "absorbed"
        # decode attention per context token: FLOPs and bytes, by path
        hd = self._heads * s.head_dim
        b = DTYPE_BYTES
        self._kv_dec = (4.0 * hd, b * self._kv)
        self._abs_dec = (4.0 * self._heads * self._d, b * self._hid)
        self._rec_dec = (4.0 * hd, b * (self._hid + 2 * self._kv))

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

    def _reproject(self, tokens: int) -> float:
        """K,V for `tokens` stored hidden vectors (per layer and rank)."""
        if tokens <= 0:
            return 0.0
        k, n = self._reproj_kn
        t = self.gemm(tokens, k, n)
        if self._sharded:  # partial sums over the d-slice, for all heads: add them up
            t += self.hw.all_reduce_time(tokens * n, self.tp)
        return t

    def _attention(self, n_pf: int, pf_flops: float, pf_bytes: float, kv_ctx: int, hid_ctx: int, n_hid: int,
                   reproj: int) -> float:
        """One layer's attention from the step's totals: n_pf prefill sequences with their summed FLOPs
        and bytes, summed decode contexts by path, hidden decodes, and tokens whose K,V are re-projected."""
        att = self.hw.attention
        t = 0.0
        if n_pf:
            t += n_pf * att.c0 + pf_flops / att.flop_rate + pf_bytes / att.byte_rate
        if kv_ctx or hid_ctx:
            hf, hb = self._abs_dec if self._absorbed else self._rec_dec
            t += att.time(self._kv_dec[0] * kv_ctx + hf * hid_ctx, self._kv_dec[1] * kv_ctx + hb * hid_ctx)
        if n_hid and self._absorbed:
            g = self._gemm_memo.get(n_hid)
            if g is None:
                g = 2 * self.gemm(n_hid, self._d, self._q_width)  # u_h = W_k,h^T q_h and W_v,h y_h
                if self._sharded:  # gather q of all heads, all-reduce scores and outputs
                    hd = self.spec.num_heads * self.spec.head_dim
                    g += 2 * self.hw.all_reduce_time(n_hid * hd, self.tp)
                self._gemm_memo[n_hid] = g
            t += g + self.hw.hidden_layer_overhead
            if self._sharded:
                t += self.hw.all_reduce_time(self.spec.num_heads * hid_ctx, self.tp)
        if reproj:
            t += self._reproject(reproj)
        return t

    def _prefill_work(self, kind: CacheKind, q: int, c: int) -> tuple[float, float, int]:
        """FLOPs and bytes of one prefill chunk's attention, and the prefix tokens it re-projects."""
        b = DTYPE_BYTES
        flops = 4.0 * q * (c - (q - 1) / 2.0) * self._heads * self.spec.head_dim
        nbytes = b * (q * (2 * self._q_width + self._kv) + (c - q) * self._kv)
        if kind == CacheKind.HIDDEN:
            return flops, nbytes + b * q * self._hid, c - q  # stores the inputs; a cached prefix is re-projected
        return flops, nbytes, 0

    def attention_layer(self, seqs) -> float:
        n_pf = kv_ctx = hid_ctx = n_hid = reproj = 0
        pf_flops = pf_bytes = 0.0
        for kind, q, c, _ in seqs:
            if q > 1 or c == q:  # prefill (or chunk): K,V computed as usual for the new tokens
                f, b, r = self._prefill_work(kind, q, c)
                n_pf += 1
                pf_flops += f
                pf_bytes += b
                reproj += r
            elif kind == CacheKind.KV:
                kv_ctx += c
            else:
                hid_ctx += c
                n_hid += 1
        if not self._absorbed:
            reproj += hid_ctx
        return self._attention(n_pf, pf_flops, pf_bytes, kv_ctx, hid_ctx, n_hid, reproj)

    def conversion_layer(self, to_kind: CacheKind, num_tokens: int) -> float:
        """hidden -> KV: one projection of the stored inputs; KV -> hidden: a re-prefill of the tokens."""
        if to_kind == CacheKind.KV:
            return self._reproject(num_tokens)
        return self.dense_layer(num_tokens)

    # -- a whole step --------------------------------------------------------------------------
    def _once(self, m: int, sampled: int) -> float:
        once = self._head_by_n.get((m, sampled))
        if once is None:
            v, t = self.spec.vocab_size // self.tp, self.tp
            once = self._head_by_n[(m, sampled)] = (
                self.gemm(sampled, self._d, v) + self.hw.all_reduce_time(sampled * v, t)  # LM head, logits gather
                + self.hw.residual_add.time(0, DTYPE_BYTES * m * self._d))  # embedding lookup
        return once

    def _dense(self, m: int) -> float:
        dense = self._dense_by_m.get(m)
        if dense is None:
            dense = self._dense_by_m[m] = self.dense_layer(m) if m else 0.0
        return dense

    def _total(self, per_layer_attn: float, m: int, sampled: int, nseq: int, conversions) -> float:
        per_layer = per_layer_attn + self._dense(m)
        for kind, n in conversions:
            per_layer += self.conversion_layer(kind, n)
        return (self.step_overhead + self.seq_overhead * nseq + self.spec.num_layers * per_layer
                + self._once(m, sampled))

    def step_time(self, seqs, conversions=()) -> float:
        """seqs: SeqWork or plain (cache_kind, num_tokens, context_len, sample) tuples;
        conversions: (to_kind, num_tokens) pairs."""
        if not seqs and not conversions:
            return 0.0
        m = sampled = 0
        for s in seqs:
            m += s[1]
            sampled += s[3]
        attn = self.attention_layer(seqs) if seqs else 0.0
        total = self._total(attn, m, sampled, len(seqs), conversions)
        if self.ragged_overhead and len({s[2] for s in seqs if s[1] == 1 and s[0] == CacheKind.KV}) > 1:
            total += self.ragged_overhead
        return total

    def plan_time(self, plan) -> float:
        """step_time of a BatchPlan, read straight from its SeqPlans (the simulator's hot path)."""
        return self.step_time([(s.cache_kind, len(s.token_ids), s.start_pos + len(s.token_ids), s.sample)
                               for s in plan.seqs], [(c.to_kind, c.num_tokens) for c in plan.conversions])

    # -- pipeline stages -------------------------------------------------------------------------
    def plan_stages(self, plan, layers: list[int]) -> StageWork:
        """A BatchPlan priced per pipeline stage; layers: how many each stage holds (whole layers, so
        per-layer work is step_time's; tp ranks within a stage as in step_time)."""
        seqs = [(s.cache_kind, len(s.token_ids), s.start_pos + len(s.token_ids), s.sample) for s in plan.seqs]
        m = sampled = 0
        for s in seqs:
            m += s[1]
            sampled += s[3]
        per_layer = (self.attention_layer(seqs) if seqs else 0.0) + self._dense(m)
        for c in plan.conversions:
            per_layer += self.conversion_layer(c.to_kind, c.num_tokens)
        host = self.step_overhead + self.seq_overhead * len(seqs)
        if self.ragged_overhead and len({s[2] for s in seqs if s[1] == 1 and s[0] == "kv"}) > 1:
            host += self.ragged_overhead
        stages = [n * per_layer for n in layers]
        stages[0] += self.hw.residual_add.time(0, DTYPE_BYTES * m * self._d)  # embedding lookup
        v = self.spec.vocab_size // self.tp  # LM head and logits gather
        stages[-1] += self.gemm(sampled, self._d, v) + self.hw.all_reduce_time(sampled * v, self.tp)
        return StageWork(host, stages, m, sampled)
