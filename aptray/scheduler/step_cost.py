"""Online model of step time, learned from the executor's measured step times (numpy, torch-free).

    step_time ~ c0 + c_tok * tokens + c_seq * seqs + c_kv * kv_blocks + c_hid * hidden_blocks
                + c_pf * prefill_pairs + c_rep * hidden_reprojected + c_hdec * hidden_decodes
                + c_hany * [any hidden decodes]

tokens: tokens the step computes (the GEMMs); seqs: sequences in the step (per-request work:
building its row, sampling, the absorbed path's per-request projections); kv_blocks /
hidden_blocks: the cache blocks its decoding sequences read (their block tables; a multi-token
chunk's attention is priced by its pairs instead: counting its blocks too put prefill work on
alpha, +33 us per hidden block in the simulated OPT-13B ShareGPT run where the cost model's truth
is about -6 us); prefill_pairs: the query x key pairs of its multi-token chunks (sum of chunk x
context, in thousands: prefill attention is quadratic); hidden_reprojected: the cached context a
hidden chunk re-projects to K, V (tokens, in thousands; a hidden -> KV conversion in the step is the
same projection of its tokens); hidden_decodes: the hidden rows decoding one token (absorbed
attention projects each one's query through W_k and its output through W_v: a cost per hidden
request, whatever its length, that the per-block alpha cannot carry); any hidden decodes: 1 when
the step has one, else 0 (the absorbed path reads W_k and W_v once per step, and on a CPU runs
its own kernels: a cost per step that the first hidden request brings and later ones share; left
out, the fit put it on the first hidden requests' blocks, alpha +200 us early in the same run). It is a least-squares fit
with exponential forgetting: the normal equations are an EWMA over steps (decay 0.99, about the last 100 steps), so the fit follows the
machine and the workload, solved on standardised features by the minimum-norm least-squares
solution, which leaves a coefficient at 0 while its feature has never varied (e.g. c_hid before
any hidden request has run).

Why these regressors: alpha is read off c_hid and c_kv. With only (1, tokens, kv_blocks,
hidden_blocks), whatever else grows with the batch lands on the block features: per-request
costs (more requests hold more blocks) and prefill attention (a chunk's table grows with its
context). Under overload hidden requests are admitted exactly when batches are largest, so
c_hid absorbed the batch's per-request cost and alpha came out several times too high (the
simulator's OPT-13B sweep: +1.5e-4..3.2e-4 s per hidden block against a true ~-1.6e-5).
The seqs and prefill features take those costs where they belong.

A weak prior alpha = 0 (a ridge on c_hid - ratio * c_kv, weighted by the fit's own noise) keeps
alpha near 0 where hidden blocks barely vary apart from the rest of the batch; noise-free data are
untouched. c_hdec has the same kind of prior, at the scale of c_seq.

The price of holding a request as hidden rather than KV is therefore alpha per hidden block plus
c_hdec per step (`hidden_price`). Without the second term the fit put OPT-13B's absorbed
per-request projections into c_seq, alpha came out ~0, apt took every request as hidden even with
memory to spare, and each step paid ~8% more (simulated ShareGPT: 1.6 req/s against 4.25 for
KV-only apt).

alpha, the apt scheduler's price of the hidden cache, is the extra seconds per hidden block over
holding the same tokens as KV: a hidden block holds hidden_block_size tokens, which as KV would
take hidden_block_size / block_size blocks, so alpha = c_hid - c_kv * hidden_block_size / block_size.
It can be negative (absorbed hidden attention reads the same bytes per physical block as KV and
holds twice the tokens): hidden is then no slower, and the scheduler takes it at face value.
"""
from __future__ import annotations

import numpy as np

from aptray.plan import BatchPlan

DECAY = 0.99
WARMUP_STEPS = 3  # steps observed before the fit is used (the start-up calibration)
PRIOR_FLOOR = 1e-6  # seconds per block: the smallest prior scale of alpha
NAMES = ("c0", "c_tok", "c_seq", "c_kv", "c_hid", "c_pf", "c_rep", "c_hdec", "c_hany")
C0, TOK, SEQ, KV, HID, PF, REP, HDEC, HANY = range(len(NAMES))


def step_features(plan: BatchPlan) -> np.ndarray:
    kv = hidden = tokens = hidden_decodes = 0
    pairs = reproj = 0.0
    for s in plan.seqs:
        n = len(s.token_ids)
        tokens += n
        if n > 1:  # a chunk: its attention is priced by its query x key pairs, not by its blocks
            pairs += n * (s.start_pos + n)
            if s.cache_kind == "hidden":
                reproj += s.start_pos
        elif s.cache_kind == "hidden":
            hidden += len(s.block_table)
            hidden_decodes += 1
        else:
            kv += len(s.block_table)
    for c in plan.conversions:  # hidden -> KV projects the stored inputs: a re-projection
        if c.to_kind == "kv":
            reproj += c.num_tokens
    return np.array([1.0, tokens, len(plan.seqs), kv, hidden, pairs / 1e3, reproj / 1e3, hidden_decodes,
                     float(hidden_decodes > 0)])


class StepCostModel:
    def __init__(self, block_size: int, hidden_block_size: int, decay: float = DECAY):
        self.hidden_tokens_ratio = hidden_block_size / block_size if hidden_block_size else 0.0
        self.decay = decay
        n = len(NAMES)
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self.coef = np.zeros(n)
        self.steps = 0
        self._sq_err = self._weight = 0.0
        v = np.zeros(n)  # alpha = c_hid - ratio * c_kv, the direction the prior holds near 0
        v[HID], v[KV] = 1.0, -self.hidden_tokens_ratio
        self._alpha_direction = v[:, None] * v

    @property
    def ready(self) -> bool:
        return self.steps >= WARMUP_STEPS

    def observe(self, plan: BatchPlan, step_time: float) -> None:
        if not plan.seqs or step_time <= 0:
            return
        self.observe_features(step_features(plan), step_time)

    def observe_features(self, x: np.ndarray, step_time: float) -> None:
        if self.steps >= WARMUP_STEPS:  # prediction error before the update: noise plus misfit
            self._sq_err = self.decay * self._sq_err + (step_time - float(self.coef @ x)) ** 2
            self._weight = self.decay * self._weight + 1.0
        self._xtx *= self.decay
        self._xtx += x[:, None] * x  # np.outer's result, without its per-call overhead (hot: once per step)
        self._xty *= self.decay
        self._xty += x * step_time
        # prior alpha ~ N(0, tau^2) with tau = what the same tokens cost as KV (c_kv * ratio, at
        # least 1 us): a ridge on the direction c_hid - ratio * c_kv of weight noise / tau^2. Where
        # the data pin alpha down it hardly moves it; where hidden blocks barely vary apart from the
        # rest (few hidden requests, always beside the same batch) it keeps alpha near 0 instead of
        # the noise-amplified values a plain fit gives (+8.6e-4 s per block seen on the CPU engine)
        a = self._xtx
        if self._weight > 0 and self.hidden_tokens_ratio:
            noise = self._sq_err / self._weight
            a = a + (noise / self.prior_scale ** 2) * self._alpha_direction
            a[HDEC, HDEC] += noise / self.prior_scale_per_decode ** 2
            a[HANY, HANY] += noise / self.prior_scale_per_step ** 2
        # standardise (features span 1 .. 1e4): the minimum-norm solution is then scale-free
        d = np.sqrt(np.diag(a))
        d[d == 0] = 1.0
        z = np.linalg.lstsq(a / (d[:, None] * d), self._xty / d, rcond=1e-10)[0]
        self.coef = z / d
        self.steps += 1

    @property
    def prior_scale(self) -> float:
        """tau of the prior alpha ~ N(0, tau^2): what a hidden block's tokens cost as KV (>= 1 us)."""
        return max(abs(float(self.coef[KV])) * self.hidden_tokens_ratio, PRIOR_FLOOR)

    @property
    def prior_scale_per_decode(self) -> float:
        """tau of the prior c_hdec ~ N(0, tau^2): what a sequence costs a step (>= 1 us)."""
        return max(abs(float(self.coef[SEQ])), PRIOR_FLOOR)

    @property
    def prior_scale_per_step(self) -> float:
        """tau of the prior c_hany ~ N(0, tau^2): a step's fixed cost (>= 1 us). With hidden decodes in
        every step the feature is the intercept's twin, and the prior keeps the step's cost on c0."""
        return max(abs(float(self.coef[C0])), PRIOR_FLOOR)

    def coefficients(self) -> dict[str, float]:
        return dict(zip(NAMES, map(float, self.coef)))

    @property
    def alpha(self) -> float:
        """Seconds of extra step time per hidden block (0 until calibrated)."""
        if not self.ready:
            return 0.0
        return float(self.coef[HID] - self.coef[KV] * self.hidden_tokens_ratio)

    @property
    def hidden_decode_cost(self) -> float:
        """Seconds of extra step time per hidden request decoding (0 until calibrated)."""
        return float(self.coef[HDEC]) if self.ready else 0.0

    @property
    def hidden_step_cost(self) -> float:
        """Seconds of extra step time when a step has any hidden decode (0 until calibrated)."""
        return float(self.coef[HANY]) if self.ready else 0.0

    def predict(self, tokens: int, kv_blocks: int, hidden_blocks: int, seqs: int = 0, prefill_pairs: float = 0.0,
                hidden_reprojected: float = 0.0, hidden_decodes: int = 0) -> float:
        x = np.array([1.0, tokens, seqs, kv_blocks, hidden_blocks, prefill_pairs / 1e3, hidden_reprojected / 1e3,
                      hidden_decodes, float(hidden_decodes > 0)])
        return float(self.coef @ x)


TBT_HEADROOM = 0.8  # the step is one gap between tokens; keep a fifth for pending time and fit error


def tbt_token_budget(cost: StepCostModel, configured: int, tbt_slo: float, num_decodes: int,
                     kv_blocks: int, hidden_blocks: int, floor: int, hidden_decodes: int = 0) -> int:
    """Tokens a step may compute and still end within the TBT SLO (Sarathi-Serve sizes its budget
    the same way from profiling). Until the cost model is calibrated, or if it sees no per-token
    cost, the configured max_num_batched_tokens; never above it, never below num_decodes + floor.
    The decodes cost their tokens and sequences and the blocks they read; the prefill tokens left
    are priced as one fresh chunk (per-token cost plus its quadratic attention)."""
    c_tok, c_pf = cost.coef[TOK], max(0.0, cost.coef[PF]) / 1e3
    if not cost.ready or c_tok <= 0:
        return configured
    room = TBT_HEADROOM * tbt_slo - cost.predict(num_decodes, kv_blocks, hidden_blocks, seqs=num_decodes + 1,
                                                 hidden_decodes=hidden_decodes)
    if room <= 0:
        prefill = 0
    elif c_pf > 0:
        prefill = int((np.sqrt(c_tok * c_tok + 4 * c_pf * room) - c_tok) / (2 * c_pf))
    else:
        prefill = int(room / c_tok)
    return max(num_decodes + floor, min(configured, num_decodes + prefill))


# A request's TBT SLO sizes the step only while a step of that length still leaves this share of
# max_num_batched_tokens to prefills: a tighter SLO (a client may ask for anything above the
# server's floor) would starve every waiting request's prefill for one request's gaps. Such a
# request is treated as lost for the budget: it still runs, and misses.
MIN_PREFILL_SHARE = 1 / 8


def binding_tbt_budget(cost: StepCostModel, configured: int, tbt_slos, num_decodes: int, kv_blocks: int,
                       hidden_blocks: int, floor: int, hidden_decodes: int = 0) -> int:
    """tbt_token_budget for the tightest of tbt_slos (the running requests' SLOs, at least one) whose
    budget keeps MIN_PREFILL_SHARE of the configured tokens for prefills; if none does (the decodes
    alone fill the steps), the loosest one's."""
    least = num_decodes + max(floor, int(configured * MIN_PREFILL_SHARE))
    for slo in sorted(set(tbt_slos)):
        budget = tbt_token_budget(cost, configured, slo, num_decodes, kv_blocks, hidden_blocks, floor,
                                  hidden_decodes)
        if budget >= least:
            break
    return budget
