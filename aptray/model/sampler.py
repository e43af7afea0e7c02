"""Token sampling: the repetition penalty, presence and frequency penalties, the tokens a request's
grammar rules out, and logit bias, then greedy, or temperature, top-k, top-p and min-p (transformers' order); seeded
requests get reproducible draws; the log-probabilities a request asks for.

The whole batch is sampled at once, with one copy to the host per step (two or three where a row asks
for top-p: _top_p reads whether every nucleus lies among a tier's candidates). Each filter runs over every row
that asks for it, and a row draws its token by inverting its cumulative probabilities at one uniform
number (one random number a row: random noise over the whole vocabulary, the exponential race, costs
a CPU several times the rest of the draw), its number from the engine's generator or, seeded, from a
generator of its own, so its draw does not depend on the rest of the batch. Where every row asks the
same (the whole batch samples, no temperature but 1, every row top-p), the filters work on the batch's
logits without copying them: a fresh tensor of tens of MB costs a CPU more than the arithmetic.

One request's sampling can never fail another's: a row whose probabilities are not a distribution
(non-finite logits from the model), or whose own rules leave no token, is reported as that request's
error.
"""
from __future__ import annotations

import numpy as np
import torch

from aptray.plan import NOTHING_ALLOWED, SeqPlan, TokenLogprobs
from aptray.sampling_params import MIN_TEMPERATURE


def filtered(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """logits [M, V] (already over each row's temperature) with the tokens each row's top-k, top-p and
    min-p drop set to -inf, in transformers' order; each filter runs only where some row asks for it."""
    vocab, device = logits.shape[-1], logits.device
    ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in seqs]
    if any(ks):
        k = torch.tensor(ks, device=device)
        kth = torch.topk(logits, max(ks), dim=-1).values.gather(1, (k - 1).clamp_min(0)[:, None])
        logits = logits.masked_fill((logits < kth) & (k > 0)[:, None], float("-inf"))
    nucleus_rows = [i for i, s in enumerate(seqs) if s.top_p < 1.0]
    if nucleus_rows:
        logits = _top_p(logits, nucleus_rows, [seqs[i].top_p for i in nucleus_rows])
    if any(s.min_p > 0.0 for s in seqs):  # the most likely token always stays: min_p <= 1
        min_p = torch.tensor([s.min_p for s in seqs], device=device, dtype=logits.dtype)
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


# a row's nucleus is looked for among its this many most likely tokens, then this many, before the
# whole vocabulary: on a CPU a top-k costs less the fewer tokens it keeps, and a whole sort more than
# either (loadgen/bench_sampler.py times top-p on a model's logits and on flatter random ones)
TOP_P_CANDIDATES = (256, 4096)


def _top_p(logits: torch.Tensor, rows: list[int], top_ps: list[float]) -> torch.Tensor:
    """logits with each listed row's tokens outside its nucleus set to -inf: the smallest set of most
    likely tokens whose probability reaches its top_p. The most likely token is always kept, so a
    vanishing top_p samples greedily instead of leaving nothing to sample from. The nucleus is looked
    for among the row's most likely tokens in widening tiers (TOP_P_CANDIDATES, each a top-k); a row
    whose candidates hold less than its top_p (a flat distribution, a high temperature) goes on to
    the next tier, and past the last is sorted whole. Each tier a row goes on to reads on the host
    whether any did."""
    every = len(rows) == logits.shape[0]  # then no copies in and out: a batch's logits are tens of MB
    index = torch.tensor(rows, device=logits.device)
    x = logits if every else logits[index]
    vocab = x.shape[-1]
    probs = torch.softmax(x, dim=-1)
    pending = torch.arange(len(rows), device=x.device)  # the rows whose nucleus is not yet found
    top_p = torch.tensor(top_ps, device=x.device, dtype=x.dtype)
    for k in [k for k in TOP_P_CANDIDATES if k < vocab] + [vocab]:
        part = probs if len(pending) == len(rows) else probs[pending]
        if k < vocab:
            candidates, order = torch.topk(part, k, dim=-1)
        else:
            candidates, order = torch.sort(part, dim=-1, descending=True)
        nucleus, reached = _nucleus(candidates, top_p[pending])
        found = torch.zeros_like(part, dtype=torch.bool).scatter_(1, order, nucleus)  # past the candidates: dropped
        if part is probs:
            keep = found
        else:
            keep[pending] = found
        if k == vocab or bool(reached.all()):
            break
        pending = pending[~reached]
    nucleus = x.masked_fill(~keep, float("-inf"))
    return nucleus if every else logits.index_copy(0, index, nucleus)


def _nucleus(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of each row's tokens (most likely first) its nucleus keeps: those whose more likely tokens
    hold less than top_p, and the first; and whether the row's tokens reach top_p (every later token
    dropped)."""
    mass = sorted_probs.cumsum(-1)
    keep = mass - sorted_probs < top_p[:, None]
    keep[:, 0] = True
    return keep, mass[:, -1] >= top_p


def biased(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """logits [N, V] with each row's seq.logit_bias added (one index_add for the batch), into a new
    tensor where any row has one."""
    rows = [i for i, seq in enumerate(seqs) if seq.logit_bias]
    if not rows:
        return logits
    index = _flat_index(logits, rows, [[t for t, _ in seqs[i].logit_bias] for i in rows])
    values = torch.tensor([b for i in rows for _, b in seqs[i].logit_bias], dtype=logits.dtype, device=logits.device)
    return logits.flatten().index_add(0, index, values).view_as(logits)


def repeated(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """logits [N, V] with transformers' repetition penalty of each row's seq: each token of its prompt
    or output (seq.seen_tokens) has its logit divided by seq.repetition_penalty where positive and
    multiplied by it where negative. One gather and one scatter for the batch, into a new tensor."""
    rows = [i for i, seq in enumerate(seqs) if seq.repetition_penalty != 1.0 and seq.seen_tokens]
    if not rows:
        return logits
    index = _flat_index(logits, rows, [seqs[i].seen_tokens for i in rows])
    factor = np.concatenate([np.full(len(seqs[i].seen_tokens), seqs[i].repetition_penalty) for i in rows])
    factor = torch.from_numpy(factor).to(device=logits.device, dtype=logits.dtype)
    flat = logits.flatten().clone()
    picked = flat[index]
    flat[index] = torch.where(picked < 0, picked * factor, picked / factor)
    return flat.view_as(logits)


def penalized(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """logits [N, V] with OpenAI's presence and frequency penalties of each row's seq: each token of its
    output less presence_penalty, and frequency_penalty per time the output holds it. One index_add
    for the whole batch, into a new tensor (the raw logits stay for log-probabilities); the counts go
    through numpy's fromiter rather than torch.tensor, which converts a Python sequence element by
    element."""
    rows = [i for i, seq in enumerate(seqs) if seq.output_counts]
    if not rows:
        return logits
    index = _flat_index(logits, rows, [seqs[i].output_counts[0] for i in rows])
    delta = []
    for i in rows:
        seq = seqs[i]
        counts = np.fromiter(seq.output_counts[1], np.float64, len(seq.output_counts[1]))
        delta.append(-(seq.presence_penalty + seq.frequency_penalty * counts))
    values = torch.from_numpy(np.concatenate(delta)).to(device=logits.device, dtype=logits.dtype)
    return logits.flatten().index_add(0, index, values).view_as(logits)


def _flat_index(logits: torch.Tensor, rows: list[int], tokens: list) -> torch.Tensor:
    """The places in logits.flatten() of each row's tokens (rows[j]'s are tokens[j]), on logits' device."""
    vocab = logits.shape[-1]
    index = np.concatenate([np.fromiter(ids, np.int64, len(ids)) + i * vocab for i, ids in zip(rows, tokens)])
    return torch.from_numpy(index).to(logits.device)


# a logit the request's grammar rules out: its probability is exactly 0 in float32 whatever the other
# logits, the temperature or a bias. Added as a matrix of 0 and this: constrained() takes 1.2 ms for
# 32 x 49,152 logits with 2 CPU threads, masked_fill with -inf 4.2 ms (loadgen.bench_grammar, 2026-12-07).
RULED_OUT = -1e30


def constrained(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """logits [N, V] with RULED_OUT added to each token a row's grammar rules out (seq.allowed_tokens,
    a bitmask of little-endian 32-bit words), into a new tensor where any row has one (the raw logits
    stay for log-probabilities)."""
    rows = [i for i, seq in enumerate(seqs) if seq.allowed_tokens]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    packed = np.frombuffer(b"".join(seqs[i].allowed_tokens for i in rows), dtype=np.uint8).reshape(len(rows), -1)
    if packed.shape[1] * 8 < vocab:
        raise ValueError(f"an allowed-token mask of {packed.shape[1] * 8} bits for a vocabulary of {vocab}")
    allowed = np.unpackbits(packed, axis=1, count=vocab, bitorder="little")
    # to the device as bytes (a quarter of the floats), made 0 / RULED_OUT there
    offset = torch.from_numpy(allowed).to(logits.device).to(logits.dtype).sub_(1).mul_(-RULED_OUT)
    if len(rows) == len(seqs):
        return logits + offset
    return logits.index_add(0, torch.tensor(rows, device=logits.device), offset)


def distributions(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """The probabilities each row samples its next token from, given its logits (biased, not greedy)."""
    temperatures = [s.temperature for s in seqs]
    if any(t != 1.0 for t in temperatures):  # else no copy: a batch's logits are tens of MB
        logits = logits / torch.tensor(temperatures, device=logits.device, dtype=logits.dtype)[:, None]
    return torch.softmax(filtered(logits, seqs), dim=-1)


def distribution(row: torch.Tensor, seq: SeqPlan) -> torch.Tensor:
    """The probabilities seq samples its next token from, given its logits row (biased, not greedy)."""
    return distributions(row[None], [seq])[0]


def _uniforms(seqs: list[SeqPlan], generator: torch.Generator, device) -> torch.Tensor:
    """One number uniform in [0, 1) per row: a seeded row's from a CPU generator of its own, so the same
    seed draws the same number whatever else is in the batch and on any device; the others' from the
    engine's generator."""
    u = torch.rand(len(seqs), generator=generator, device=device)
    seeded = [j for j, seq in enumerate(seqs) if seq.seed is not None]
    if not seeded:
        return u
    own = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(seqs[j].seed * 1_000_003
                                                                             + seqs[j].sample_index))
                     for j in seeded])
    return u.index_copy(0, torch.tensor(seeded, device=device), own.to(device))


def _drawn(probs: torch.Tensor, seqs: list[SeqPlan], generator: torch.Generator,
           most_likely: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token drawn from its probabilities [M, V], which it overwrites (inverse CDF: the first
    token whose cumulative probability passes the row's uniform number times its total, so a token of
    probability 0 is never drawn), and whether the row is a distribution (a finite, positive total). A
    number that rounds up to the total (a chance near 2**-24) takes the row's most likely token."""
    cdf = probs.cumsum_(dim=-1)  # in place: a fresh tensor of that size costs more than the sum
    total = cdf[:, -1]
    u = _uniforms(seqs, generator, probs.device) * total
    tokens = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1)
    return torch.where(tokens < probs.shape[-1], tokens, most_likely), total > 0


def sample(logits: torch.Tensor, seqs: list[SeqPlan], generator: torch.Generator
           ) -> tuple[list[int | None], dict[int, str], set[int]]:
    """One token per row of logits [N, V] (fp32), row i sampled as seqs[i] asks. Returns the tokens
    (None where a row failed), the failed rows' errors by row index, and which of those rows failed
    by the request's own rules (every token ruled out: NOTHING_ALLOWED, a client error)."""
    logits = biased(constrained(penalized(repeated(logits, seqs), seqs), seqs), seqs)
    tokens = logits.argmax(dim=-1)  # greedy rows keep theirs
    drawn = [i for i, seq in enumerate(seqs) if seq.temperature >= MIN_TEMPERATURE]
    none_allowed = not_finite = torch.zeros_like(tokens)
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        x = logits if len(drawn) == len(seqs) else logits[rows]
        drawn_seqs = [seqs[i] for i in drawn]
        drawn_tokens, distribution_ok = _drawn(distributions(x, drawn_seqs), drawn_seqs, generator, tokens[rows])
        tokens = tokens.index_copy(0, rows, drawn_tokens)
        ruled_out = torch.isneginf(x.amax(dim=-1))  # every token -inf (a NaN row's max is NaN)
        broken = ~distribution_ok  # a NaN anywhere in a row makes its total NaN
        none_allowed = none_allowed.index_copy(0, rows, ruled_out.long())
        not_finite = not_finite.index_copy(0, rows, (broken & ~ruled_out).long())
    out: list[int | None] = []
    errors: dict[int, str] = {}
    own: set[int] = set()
    for row, (token, nothing, broken) in enumerate(torch.stack([tokens, none_allowed, not_finite], 1).tolist()):
        out.append(None if nothing or broken else token)
        if nothing:
            errors[row] = f"sampling failed: {NOTHING_ALLOWED}"
            own.add(row)
        elif broken:
            errors[row] = "sampling failed: the model's logits are not finite for this request: nothing to sample from"
    return out, errors, own


# the floor of a reported log-probability: -inf (a token the model rules out) has no JSON number
MIN_LOGPROB = -9999.0


def scored(logits: torch.Tensor, targets, ks: list[int]) -> list[TokenLogprobs | None]:
    """Row i's log-probability of token targets[i], its rank and its ks[i] most likely tokens', from raw
    logits [N, V]; None where the row's logits are not finite (NaN)."""
    lps = torch.log_softmax(logits, dim=-1).clamp_min(MIN_LOGPROB)
    chosen = lps.gather(1, torch.tensor(list(targets), device=lps.device)[:, None])
    ranks = ((lps > chosen).sum(dim=1) + 1).tolist()  # 1 + the tokens more likely than the target
    chosen = chosen.squeeze(1).tolist()
    k = max(ks)
    top_values, top_ids = torch.topk(lps, k) if k else (lps[:, :0], lps[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [None if c != c else TokenLogprobs(c, tuple(zip(ids[:n], values[:n])), rank)  # c != c: NaN
            for c, rank, n, ids, values in zip(chosen, ranks, ks, top_ids, top_values)]


def token_logprobs(logits: torch.Tensor, seqs: list[SeqPlan], tokens: list[int | None]
                   ) -> tuple[dict[int, TokenLogprobs], dict[int, str]]:
    """For the rows whose request asks (seq.logprobs is not None) and that got a token: the token's
    log-probability and the seq.logprobs most likely tokens', from the raw logits (before penalties,
    bias, temperature and filters). Returns them by row index, and the rows that failed (non-finite
    logits) with why."""
    rows = [i for i, (seq, t) in enumerate(zip(seqs, tokens)) if seq.logprobs is not None and t is not None]
    if not rows:
        return {}, {}
    out, errors = {}, {}
    for row, lp in zip(rows, scored(logits[rows], [tokens[i] for i in rows], [seqs[i].logprobs for i in rows])):
        if lp is None:
            errors[row] = "the model's logits are not finite for this request: no log-probabilities"
        else:
            out[row] = lp
    return out, errors
