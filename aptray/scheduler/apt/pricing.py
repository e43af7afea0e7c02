"""Step time, priced by the step-cost model: what holding a request as hidden costs over KV, what a
re-projection or a re-prefill costs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aptray.scheduler.step_cost import C_PF, C_REP, C_SEQ, C_TOK, StepCostModel

# While the fit cannot tell hidden from KV (every part of the price within RESOLUTION of 0), hidden
# costs this token price: KV where it fits, hidden where only hidden fits. A price of exactly 0 makes
# every admission hidden (the denser item), so no step mixes kinds and the fit never learns what
# hidden costs (simulated OPT-13B ShareGPT: all hidden, steps ~8% slower, 1.6 against 4.25 req/s).
UNRESOLVED_HIDDEN_PRICE = 1e-9  # seconds, far below any pending time
RESOLUTION = 0.05  # a fitted price within this share of its prior scale counts as 0
STEP_DECAY = 0.9  # EWMA of step times (about the last 10 steps)
# The choice of KV over hidden follows the price averaged over about the last 50 steps: where the
# batch is mostly hidden the fit trades c_hdec against c_seq from one step to the next (simulator:
# c_hdec 0 -> 6.3 -> 0 ms in three runs), and the choice must follow the cost, not that noise.
PRICE_DECAY = 0.98


def resolved(value: float, scale: float) -> float:
    """value, or 0 while it is within RESOLUTION of its prior scale of 0."""
    return value if abs(value) > RESOLUTION * scale else 0.0


@dataclass(frozen=True)
class HiddenPrice:
    """Extra step seconds of holding a request as hidden rather than KV, as the fit stands."""
    per_block: float       # alpha: per hidden block
    per_decode: float      # c_hdec: per hidden request decoding (absorbed attention's projections)
    per_step: float        # c_hany: of a step having any hidden decode, paid by the first one
                           # (at the margin; split over the hidden set where the set is priced)
    avg_per_block: float   # per_block averaged over about the last 50 steps
    avg_per_decode: float  # per_decode, the same

    @property
    def costs_time(self) -> bool:
        """Whether each hidden request costs step time of its own (the per-step part aside)."""
        return self.per_block > 0 or self.per_decode > 0

    def step_share(self, hidden_decoding: bool) -> float:
        """The per-step part a new hidden request pays: none once a hidden request decodes."""
        return 0.0 if hidden_decoding else self.per_step

    def set_share(self, hidden_decoders: int) -> float:
        """The per-step part split over a set of hidden requests decoding: each one's share."""
        return self.per_step / max(1, hidden_decoders)

    def of(self, hidden_blocks: np.ndarray, step_share: float) -> np.ndarray | float:
        """Per request holding hidden_blocks: the price (a tie-break toward KV while unresolved)."""
        if not (self.per_block or self.per_decode or step_share):
            return UNRESOLVED_HIDDEN_PRICE
        return self.per_block * hidden_blocks + self.per_decode + step_share

    def smoothed(self, hidden_blocks: np.ndarray, step_share: float) -> np.ndarray:
        """The same by the averaged fit: what the choice of KV over hidden follows."""
        return self.avg_per_block * hidden_blocks + self.avg_per_decode + step_share


class Pricing:
    """Reads prices off the step-cost model and keeps the averages they need."""

    def __init__(self, cost: StepCostModel, block_size: int, hidden_block_size: int):
        self.cost = cost
        self.r = block_size / hidden_block_size if hidden_block_size else 1.0  # hidden / KV bytes per token
        self.step_seconds = 0.0  # EWMA of step times
        self.avg_per_block = self.avg_per_decode = 0.0

    def observe(self, plan, step_time: float) -> None:
        """After the step-cost model has seen the step."""
        if plan.seqs and step_time > 0:
            self.step_seconds = STEP_DECAY * self.step_seconds + (1 - STEP_DECAY) * step_time
        if self.cost.ready:
            self.avg_per_block = PRICE_DECAY * self.avg_per_block + (1 - PRICE_DECAY) * self._per_block()
            self.avg_per_decode = PRICE_DECAY * self.avg_per_decode + (1 - PRICE_DECAY) * self._per_decode()

    def _per_block(self) -> float:
        return resolved(self.cost.alpha, self.cost.prior_scale)

    def _per_decode(self) -> float:
        return resolved(self.cost.hidden_decode_cost, self.cost.prior_scale_per_decode)

    def hidden_price(self) -> HiddenPrice:
        return HiddenPrice(self._per_block(), self._per_decode(),
                           resolved(self.cost.hidden_step_cost, self.cost.prior_scale_per_step),
                           self.avg_per_block, self.avg_per_decode)

    def kv_worth_its_memory(self, price, num_running: int) -> np.ndarray:
        """Per request, by its price of being hidden: whether hidden costs more step time than its
        memory buys. A hidden request frees (1 - r) of its KV blocks, room for (1 - r) more
        requests, and adds its price to a step the N running requests share: hidden pays while
        price < (1 - r) * step / N."""
        return np.asarray(price) > (1 - self.r) * self.step_seconds / max(1, num_running)

    def reprojection_tokens(self, tokens):
        """Step time of re-projecting `tokens` stored hidden vectors to K, V, in tokens of the step's
        per-token cost (0 until the cost model sees both); element-wise for a numpy array."""
        c = self.cost.coef
        if not self.cost.ready or c[C_TOK] <= 0 or c[C_REP] <= 0:
            return np.zeros_like(tokens) if np.ndim(tokens) else 0
        out = c[C_REP] / 1e3 * np.asarray(tokens) / c[C_TOK]
        return out.astype(np.int64) if np.ndim(out) else int(out)

    def tokens_of_seconds(self, seconds: float) -> int:
        """Step time in tokens of the step's per-token cost (0 until the cost model sees one)."""
        c = self.cost.coef
        if not self.cost.ready or c[C_TOK] <= 0:
            return 0
        return int(seconds / c[C_TOK])

    def recompute_seconds(self, tokens: np.ndarray) -> np.ndarray:
        """Seconds to re-prefill `tokens` tokens in one chunk (0 until the cost model is calibrated)."""
        if not self.cost.ready:
            return np.zeros(len(tokens))
        c = self.cost.coef
        t = tokens.astype(float)
        return np.maximum(0.0, c[C_TOK] * t + c[C_SEQ] + c[C_PF] * t * t / 1e3)
