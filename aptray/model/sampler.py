"""Token sampling: the repetition penalty, presence and frequency penalties, the tokens a request's
grammar rules out, and logit bias, then greedy, or temperature, top-k, top-p and min-p (transformers' order); seeded
requests get reproducible draws; the log-probabilities a request asks for.

The whole batch is sampled at once, with one copy to the host per step, and one more per tier of
candidates where a row asks for top-k, top-p or min-p: such a row is drawn from its most likely tokens
alone (a top-k of the batch's logits) where they hold all it may draw, and only the rest pay for a
whole vocabulary's probabilities. Each filter runs over every row that asks for it, and a row draws
its token by inverting its cumulative probabilities at one uniform number (one random number a row:
random noise over the whole vocabulary, the exponential race, costs a CPU several times the rest of
the draw), its number from the engine's generator or, seeded, from a generator of its own, so its
draw does not depend on the rest of the batch. Where every row asks the same (the whole batch
samples, no temperature but 1), the sampler works on the batch's logits without copying them: a
fresh tensor of tens of MB costs a CPU more than the arithmetic.

One request's sampling can never fail another's: a row with a NaN or +inf logit from the model
(greedy or sampled, whatever its filters would drop), or whose own rules leave no token, is reported
as that request's error.
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


def _top_p(logits: torch.Tensor, rows: list[int], top_ps: list[float]) -> torch.Tensor:
    """logits with each listed row's tokens outside its nucleus set to -inf: the smallest set of most
    likely tokens whose probability reaches its top_p. The most likely token is always kept, so a
    vanishing top_p samples greedily instead of leaving nothing to sample from. Each row is sorted
    whole: the sampler draws a row whose nucleus lies among its most likely tokens without coming here
    (_drawn_among_top)."""
    every = len(rows) == logits.shape[0]  # then no copies in and out: a batch's logits are tens of MB
    index = torch.tensor(rows, device=logits.device)
    x = logits if every else logits[index]
    probs, order = torch.sort(torch.softmax(x, dim=-1), dim=-1, descending=True)
    keep, _ = _nucleus(probs, torch.tensor(top_ps, device=x.device, dtype=x.dtype))
    nucleus = x.masked_fill(~torch.zeros_like(keep).scatter_(1, order, keep), float("-inf"))
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
    return torch.softmax(filtered(_over_temperatures(logits, seqs), seqs), dim=-1)


def _over_temperatures(logits: torch.Tensor, seqs: list[SeqPlan]) -> torch.Tensor:
    """Each row over its temperature; logits themselves where every row's is 1 (no copy: a batch's logits
    are tens of MB)."""
    temperatures = [s.temperature for s in seqs]
    if all(t == 1.0 for t in temperatures):
        return logits
    return logits / torch.tensor(temperatures, device=logits.device, dtype=logits.dtype)[:, None]


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


def _drawn(probs: torch.Tensor, u: torch.Tensor, most_likely: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token drawn from its probabilities [M, V], which it overwrites (inverse CDF: the first
    token whose cumulative probability passes the row's uniform number u times its total, so a token of
    probability 0 is never drawn), and whether the row is a distribution (a finite, positive total). A
    number that rounds up to the total (a chance near 2**-24) takes the row's most likely token."""
    cdf = probs.cumsum_(dim=-1)  # in place: a fresh tensor of that size costs more than the sum
    total = cdf[:, -1]
    tokens = torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(1)
    return torch.where(tokens < probs.shape[-1], tokens, most_likely), total > 0


# a row that asks top-k, top-p or min-p is drawn from its this many most likely tokens, then this many,
# where they hold all it may draw, before its whole vocabulary: on a CPU a top-k costs less the fewer
# tokens it keeps, and a whole sort more than either (loadgen/bench_sampler.py times them on a model's
# logits and on flatter random ones)
CANDIDATE_TIERS = (256, 4096)


def _draw(x: torch.Tensor, seqs: list[SeqPlan], generator: torch.Generator,
          most_likely: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token drawn as its seq asks from its logits x [M, V], and whether its probabilities are
    a distribution. A row asking top-k, top-p or min-p is drawn from its most likely tokens alone where
    they hold all it may draw, in widening tiers (CANDIDATE_TIERS, each a top-k: _drawn_among_top); past
    the last, and for the other rows, from its whole distribution."""
    u = _uniforms(seqs, generator, x.device)
    vocab = x.shape[-1]
    tokens, ok = most_likely, torch.ones_like(most_likely, dtype=torch.bool)
    narrow = [s.top_p < 1.0 or 0 < s.top_k < vocab or s.min_p > 0.0 for s in seqs]
    pending = [j for j, n in enumerate(narrow) if n]
    whole = [j for j, n in enumerate(narrow) if not n]
    normalizers = _log_normalizers(x, [j for j in pending if not 0 < seqs[j].top_k < vocab], seqs)
    for width in dict.fromkeys(min(w, vocab) for w in CANDIDATE_TIERS):
        if not pending:
            break
        index = torch.tensor(pending, device=x.device)
        every = len(pending) == len(seqs)
        drawn, drawn_ok, held = _drawn_among_top(*_rows(index, every, x, u, most_likely, normalizers),
                                                 [seqs[j] for j in pending], width)
        tokens, ok = _put(tokens, index, every, drawn), _put(ok, index, every, drawn_ok)
        pending = [j for j, h in zip(pending, held.tolist()) if not h]
    whole = sorted(whole + pending)
    if whole:  # rows with no filter, and those no tier held (top-p sorts them whole)
        index = torch.tensor(whole, device=x.device)
        every = len(whole) == len(seqs)
        whole_x, whole_u, whole_likely = _rows(index, every, x, u, most_likely)
        drawn, drawn_ok = _drawn(distributions(whole_x, [seqs[j] for j in whole]), whole_u, whole_likely)
        tokens, ok = _put(tokens, index, every, drawn), _put(ok, index, every, drawn_ok)
    return tokens, ok


def _rows(index: torch.Tensor, every: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The index's rows of each tensor; the tensors themselves where it holds every row (no copy)."""
    return tensors if every else tuple(t[index] for t in tensors)


def _put(into: torch.Tensor, index: torch.Tensor, every: bool, values: torch.Tensor) -> torch.Tensor:
    """into with the index's rows replaced by values; values themselves where it holds every row."""
    return values if every else into.index_copy(0, index, values)


def _drawn_among_top(x: torch.Tensor, u: torch.Tensor, most_likely: torch.Tensor, normalizers: torch.Tensor,
                     seqs: list[SeqPlan], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows asking top-k, top-p or min-p drawn from their `width` most likely tokens: each row's token, by
    the same inverse CDF over the same probabilities in vocabulary order as _drawn; whether its
    probabilities are a distribution; and whether those tokens hold all the row may draw (its top-k is
    under width with no tie at its edge, or its nucleus lies among them, or its min-p drops the last of
    them). A row they do not hold is drawn again. normalizers: the log of each row's softmax
    denominator over its whole vocabulary, where it asks no top-k (_log_normalizers)."""
    vocab, device = x.shape[-1], x.device
    raw, ids = torch.topk(x, width, dim=-1)  # most likely first: dividing by a temperature keeps the order
    temperatures = torch.tensor([s.temperature for s in seqs], device=device, dtype=x.dtype)[:, None]
    values = raw / temperatures
    k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in seqs], device=device)
    in_top_k = torch.arange(width, device=device) < k[:, None]
    by_k = k < width
    # transformers' top-k keeps every token that ties its k-th: a tie at the edge may reach past width
    kth = values.gather(1, (k.clamp(max=width) - 1)[:, None])
    after = values.gather(1, k.clamp(max=width - 1)[:, None])
    exact_k = by_k & (after < kth).squeeze(1)
    values = values.masked_fill(~in_top_k, float("-inf"))
    # a row with a top-k normalizes over it: where held, it lies among the candidates
    lse = torch.where(k == vocab, normalizers, torch.logsumexp(values, dim=-1))
    probs = (values - lse[:, None]).exp()
    top_p = torch.tensor([s.top_p for s in seqs], device=device, dtype=x.dtype)
    nucleus, reached = _nucleus(probs, top_p)
    keep = (nucleus | (top_p >= 1.0)[:, None]) & in_top_k
    held = (top_p < 1.0) & reached
    if any(s.min_p > 0.0 for s in seqs):  # relative to the most likely: the same before and after top-p
        floor = torch.tensor([s.min_p for s in seqs], device=device, dtype=x.dtype)[:, None] * probs[:, :1]
        keep &= probs >= floor
        held |= probs[:, -1] < floor.squeeze(1)
    # a top-k past width, or a tie at its edge: its normalizer is past the candidates
    held = torch.where(by_k, exact_k, held & (k == vocab))
    in_vocab_order, order = ids.sort(dim=-1)
    cdf = probs.masked_fill(~keep, 0.0).gather(1, order).cumsum_(dim=-1)
    total = cdf[:, -1]
    position = torch.searchsorted(cdf, (u * total)[:, None], right=True)
    tokens = in_vocab_order.gather(1, position.clamp(max=width - 1)).squeeze(1)
    return torch.where(position.squeeze(1) < width, tokens, most_likely), total > 0, held


# rows of logits a CPU exponentiates at a time: a block's scratch memory is reused from one to the next,
# where a whole batch's (tens of MB) would be fresh pages every step, and cost more than the arithmetic
CPU_BLOCK_ROWS = 32


def _log_normalizers(x: torch.Tensor, rows: list[int], seqs: list[SeqPlan]) -> torch.Tensor:
    """log(sum(exp(x[i] / t))) for each of rows, over seqs[i]'s temperature t (0 for the other rows)."""
    out = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    if not rows:
        return out
    index = torch.tensor(rows, device=x.device)
    (part,) = _rows(index, len(rows) == x.shape[0], x)
    most = part.amax(dim=-1, keepdim=True)
    t = torch.tensor([seqs[i].temperature for i in rows], device=x.device, dtype=x.dtype)[:, None]
    block = CPU_BLOCK_ROWS if x.device.type == "cpu" else len(rows)
    sums = torch.cat([(part[i:i + block] - most[i:i + block]).div_(t[i:i + block]).exp_().sum(-1)
                      for i in range(0, len(rows), block)])
    return out.index_copy(0, index, (most / t).squeeze(1) + sums.log())


def sample(logits: torch.Tensor, seqs: list[SeqPlan], generator: torch.Generator
           ) -> tuple[list[int | None], dict[int, str], set[int]]:
    """One token per row of logits [N, V] (fp32), row i sampled as seqs[i] asks. Returns the tokens
    (None where a row failed), the failed rows' errors by row index, and which of those rows failed
    by the request's own rules (every token ruled out: NOTHING_ALLOWED, a client error)."""
    logits = biased(constrained(penalized(repeated(logits, seqs), seqs), seqs), seqs)
    tokens = logits.argmax(dim=-1)  # greedy rows keep theirs
    peak = logits.gather(1, tokens[:, None]).squeeze(1)  # each row's largest logit: NaN where any is
    none_allowed = torch.isneginf(peak)  # every token -inf
    # a NaN or +inf logit fails its row, greedy or drawn, even where a filter drops that token
    not_finite = torch.isnan(peak) | torch.isposinf(peak)
    drawn = [i for i, seq in enumerate(seqs) if seq.temperature >= MIN_TEMPERATURE]
    if drawn:
        rows = torch.tensor(drawn, device=logits.device)
        x = logits if len(drawn) == len(seqs) else logits[rows]
        drawn_seqs = [seqs[i] for i in drawn]
        drawn_tokens, distribution_ok = _draw(x, drawn_seqs, generator, tokens[rows])
        tokens = tokens.index_copy(0, rows, drawn_tokens)
        not_finite = not_finite.index_copy(0, rows, (not_finite[rows] | ~distribution_ok) & ~none_allowed[rows])
    out: list[int | None] = []
    errors: dict[int, str] = {}
    own: set[int] = set()
    flags = torch.stack([tokens, none_allowed.long(), not_finite.long()], 1).tolist()
    for row, (token, nothing, broken) in enumerate(flags):
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
