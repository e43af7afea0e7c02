"""Token sampling: greedy, temperature, top-k, top-p; seeded requests get reproducible draws."""
from __future__ import annotations

import torch

from aptray.plan import SeqPlan


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[SeqPlan], generator: torch.Generator) -> list[int]:
    """One token per row of logits [N, V] (fp32), row i sampled as seqs[i] asks."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, seq in enumerate(seqs):
        if seq.temperature == 0.0:
            out.append(greedy[row])
            continue
        filtered = _filter(logits[row] / seq.temperature, seq.top_k, seq.top_p)
        probs = torch.softmax(filtered, dim=-1)
        gen = generator
        if seq.seed is not None:  # the same seed gives the same tokens, whatever else is in the batch
            gen = torch.Generator(device=logits.device).manual_seed(seq.seed * 1_000_003 + seq.sample_index)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
