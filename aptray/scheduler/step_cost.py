"""Online model of a step's time, fitted to the executor's measured step times (numpy, torch-free).

    step_time ~ c0 + c_tok * tokens + c_seq * seqs + c_kv * kv_blocks + c_hid * hidden_blocks
                + c_pf * prefill_pairs + c_rep * hidden_reprojected + c_hdec * hidden_decodes
                + c_hany * [any hidden decode]

- tokens: tokens the step computes (the GEMMs).
- seqs: sequences in the step: per-request work (its row, sampling). Left out, it lands on the
  block features, which grow with the batch (alpha came out ~10x too high under overload).
- kv_blocks, hidden_blocks: the block tables of the decoding rows (what their attention reads).
  A multi-token chunk is priced by its pairs instead: its blocks put prefill work on alpha.
- prefill_pairs: query x key pairs of the multi-token chunks (sum of chunk x context, in
  thousands): prefill attention is quadratic.
- hidden_reprojected: cached tokens a hidden chunk re-projects to K, V, and the tokens of the
  step's hidden -> KV conversions (the same projection), in thousands.
- hidden_decodes: hidden rows decoding one token. Absorbed attention projects each one's query
  through W_k and its output through W_v: a cost per request, whatever its length, that a price
  per block cannot carry.
- any hidden decode: 1 when the step has one. The absorbed path reads W_k and W_v once per step,
  a cost the first hidden request brings and later ones share; left out, it lands on the first
  hidden requests' blocks.

The fit is least squares with exponential forgetting: the normal equations are EWMAs (DECAY, about
the last 100 steps), solved on standardised features by the minimum-norm solution, which leaves a
coefficient at 0 while its feature has never varied (c_hid before any hidden request has run).
Priors of 0 (ridges weighted by the fit's own prediction noise; noise-free data are untouched)
keep the hidden terms near 0 where hidden work barely varies apart from the rest of the batch,
where a plain fit amplifies noise: alpha ~ N(0, (c_kv * ratio)^2), c_hdec ~ N(0, c_seq^2),
c_hany ~ N(0, c0^2).

alpha, the apt scheduler's price per hidden block, is the extra seconds of a hidden block over the
same tokens as KV (a hidden block holds hidden_block_size / block_size KV blocks' tokens):
alpha = c_hid - c_kv * hidden_block_size / block_size. It can be negative (absorbed hidden
attention reads the same bytes per physical block as KV and holds twice the tokens): hidden is
then faster as well as smaller.
"""
from __future__ import annotations

import numpy as np

from aptray.plan import BatchPlan
from aptray.request import CacheKind

DECAY = 0.99
WARMUP_STEPS = 3  # steps observed before the fit is used (the start-up calibration)
PRIOR_FLOOR = 1e-6  # seconds per block: the smallest prior scale of alpha
NAMES = ("c0", "c_tok", "c_seq", "c_kv", "c_hid", "c_pf", "c_rep", "c_hdec", "c_hany")
C0, C_TOK, C_SEQ, C_KV, C_HID, C_PF, C_REP, C_HDEC, C_HANY = range(len(NAMES))  # indices into coef
# what step_features returns, in its order (the feature each coefficient of NAMES prices)
FEATURES = ("one", "tokens", "seqs", "kv_blocks", "hidden_blocks", "prefill_pairs_k", "reprojected_k",
            "hidden_decodes", "any_hidden_decode")


def step_features(plan: BatchPlan) -> np.ndarray:
    kv = hidden = tokens = hidden_decodes = 0
    pairs = reproj = 0.0
    for s in plan.seqs:
        n = len(s.token_ids)
        tokens += n
        if n > 1:  # a chunk: its attention is priced by its query x key pairs, not by its blocks
            pairs += n * (s.start_pos + n)
            if s.cache_kind == CacheKind.HIDDEN:
                reproj += s.start_pos
        elif s.cache_kind == CacheKind.HIDDEN:
            hidden += len(s.block_table)
            hidden_decodes += 1
        else:
            kv += len(s.block_table)
    for c in plan.conversions:  # hidden -> KV projects the stored inputs: a re-projection
        if c.to_kind == CacheKind.KV:
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
        v[C_HID], v[C_KV] = 1.0, -self.hidden_tokens_ratio
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
            a[C_HDEC, C_HDEC] += noise / self.prior_scale_per_decode ** 2
            a[C_HANY, C_HANY] += noise / self.prior_scale_per_step ** 2
        # standardise (features span 1 .. 1e4): the minimum-norm solution is then scale-free
        d = np.sqrt(np.diag(a))
        d[d == 0] = 1.0
        z = np.linalg.lstsq(a / (d[:, None] * d), self._xty / d, rcond=1e-10)[0]
        self.coef = z / d
        self.steps += 1

    @property
    def prior_scale(self) -> float:
        """tau of the prior alpha ~ N(0, tau^2): what a hidden block's tokens cost as KV (>= 1 us)."""
        return max(abs(float(self.coef[C_KV])) * self.hidden_tokens_ratio, PRIOR_FLOOR)

    @property
    def prior_scale_per_decode(self) -> float:
        """tau of the prior c_hdec ~ N(0, tau^2): what a sequence costs a step (>= 1 us)."""
        return max(abs(float(self.coef[C_SEQ])), PRIOR_FLOOR)

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
        return float(self.coef[C_HID] - self.coef[C_KV] * self.hidden_tokens_ratio)

    @property
    def hidden_decode_cost(self) -> float:
        """Seconds of extra step time per hidden request decoding (0 until calibrated)."""
        return float(self.coef[C_HDEC]) if self.ready else 0.0

    @property
    def hidden_step_cost(self) -> float:
        """Seconds of extra step time when a step has any hidden decode (0 until calibrated)."""
        return float(self.coef[C_HANY]) if self.ready else 0.0

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
    c_tok, c_pf = cost.coef[C_TOK], max(0.0, cost.coef[C_PF]) / 1e3
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
