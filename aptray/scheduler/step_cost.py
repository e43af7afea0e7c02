"""Online model of step time, learned from the executor's measured step times (numpy, torch-free).

    step_time ~ c0 + c_tok * tokens + c_kv * kv_blocks + c_hid * hidden_blocks

where tokens are the tokens the step computes and kv_blocks / hidden_blocks the cache blocks its
sequences touch (their block tables). It is a least-squares fit with exponential forgetting: the
normal equations are an EWMA over steps (decay 0.95, about the last 20 steps), so the fit follows
the machine and the workload, and it is solved by the minimum-norm least-squares solution, which
leaves a coefficient at 0 while its feature has never varied (e.g. c_hid before any hidden request
has run).

alpha, the apt scheduler's price of the hidden cache, is the extra seconds per hidden block over
holding the same tokens as KV: a hidden block holds hidden_block_size tokens, which as KV would
take hidden_block_size / block_size blocks, so alpha = c_hid - c_kv * hidden_block_size / block_size.
It can be negative (absorbed hidden attention reads half the bytes of KV): hidden is then cheaper
in time as well as memory, and the scheduler takes it at face value.
"""
from __future__ import annotations

import numpy as np

from aptray.plan import BatchPlan

DECAY = 0.95
WARMUP_STEPS = 3  # steps observed before the fit is used (the start-up calibration)


def step_features(plan: BatchPlan) -> np.ndarray:
    kv = hidden = 0
    for s in plan.seqs:
        if s.cache_kind == "hidden":
            hidden += len(s.block_table)
        else:
            kv += len(s.block_table)
    return np.array([1.0, plan.num_tokens, kv, hidden])


class StepCostModel:
    def __init__(self, block_size: int, hidden_block_size: int, decay: float = DECAY):
        self.hidden_tokens_ratio = hidden_block_size / block_size if hidden_block_size else 0.0
        self.decay = decay
        self._xtx = np.zeros((4, 4))
        self._xty = np.zeros(4)
        self.coef = np.zeros(4)  # c0, c_tok, c_kv, c_hid
        self.steps = 0

    @property
    def ready(self) -> bool:
        return self.steps >= WARMUP_STEPS

    def observe(self, plan: BatchPlan, step_time: float) -> None:
        if not plan.seqs or step_time <= 0:
            return
        x = step_features(plan)
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x * step_time
        self.coef = np.linalg.lstsq(self._xtx, self._xty, rcond=None)[0]
        self.steps += 1

    @property
    def alpha(self) -> float:
        """Seconds of extra step time per hidden block (0 until calibrated)."""
        if not self.ready:
            return 0.0
        return float(self.coef[3] - self.coef[2] * self.hidden_tokens_ratio)

    def predict(self, tokens: int, kv_blocks: int, hidden_blocks: int) -> float:
        return float(self.coef @ np.array([1.0, tokens, kv_blocks, hidden_blocks]))


TBT_HEADROOM = 0.8  # the step is one gap between tokens; keep a fifth for pending time and fit error


def tbt_token_budget(cost: StepCostModel, configured: int, tbt_slo: float, num_decodes: int,
                     kv_blocks: int, hidden_blocks: int, floor: int) -> int:
    """Tokens a step may compute and still end within the TBT SLO (Sarathi-Serve sizes its budget
    the same way from profiling). Until the cost model is calibrated, or if it sees no per-token
    cost, the configured max_num_batched_tokens; never above it, never below num_decodes + floor."""
    c_tok = cost.coef[1]
    if not cost.ready or c_tok <= 0:
        return configured
    fixed = cost.predict(0, kv_blocks, hidden_blocks)
    budget = int((TBT_HEADROOM * tbt_slo - fixed) / c_tok)
    return max(num_decodes + floor, min(configured, budget))
