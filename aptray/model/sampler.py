"""Token sampling: logit bias, then greedy, or temperature, top-k, top-p and min-p (transformers'
order); seeded requests get reproducible draws.

One request's sampling can never fail another's: each row is sampled on its own, and a row whose
probabilities are not a distribution (non-finite logits from the model) is reported as that
request's error instead of reaching torch.multinomial, which raises on CPU and may trip a
device-side assert on CUDA.
"""
from __future__ import annotations

import torch

from aptray.plan import SeqPlan
from aptray.sampling_params import MIN_TEMPERATURE


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest set reaching top_p; the most likely token is always kept, so a vanishing
        # top_p samples greedily instead of leaving nothing to sample from
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:  # the most likely token always stays: min_p <= 1
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def _biased(row: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    ids, values = zip(*bias)
    return row.index_add(0, torch.tensor(ids, device=row.device),
                         torch.tensor(values, dtype=row.dtype, device=row.device))


def distribution(row: torch.Tensor, seq: SeqPlan) -> torch.Tensor:
    """The probabilities seq samples its next token from, given its logits row (biased, not greedy)."""
    return torch.softmax(_filter(row / seq.temperature, seq.top_k, seq.top_p, seq.min_p), dim=-1)


def _draw(row: torch.Tensor, seq: SeqPlan, generator: torch.Generator) -> int:
    probs = distribution(row, seq)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise ValueError("the model's logits are not finite for this request: nothing to sample from")
    gen = generator
    if seq.seed is not None:  # the same seed gives the same tokens, whatever else is in the batch
        gen = torch.Generator(device=row.device).manual_seed(seq.seed * 1_000_003 + seq.sample_index)
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits: torch.Tensor, seqs: list[SeqPlan], generator: torch.Generator
           ) -> tuple[list[int | None], dict[int, str]]:
    """One token per row of logits [N, V] (fp32), row i sampled as seqs[i] asks. Returns the tokens
    (None where a row failed) and the failed rows' errors by row index."""
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int | None] = []
    errors: dict[int, str] = {}
    for row, seq in enumerate(seqs):
        if seq.temperature < MIN_TEMPERATURE and not seq.logit_bias:
            out.append(greedy[row])
            continue
        try:
            x = _biased(logits[row], seq.logit_bias) if seq.logit_bias else logits[row]
            out.append(int(x.argmax()) if seq.temperature < MIN_TEMPERATURE else _draw(x, seq, generator))
        except (ValueError, RuntimeError) as e:
            out.append(None)
            errors[row] = f"sampling failed: {e}"
    return out, errors
