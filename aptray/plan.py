"""BatchPlan: what one iteration computes, as the scheduler decides it and every shard runs it.

Immutable records with primitive fields (a cache kind is a CacheKind, a str whose value the
proto carries), mirrored one-to-one by the gRPC message in aptray/proto, so the scheduler stays
torch-free and shards hold no scheduling state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from aptray.request import CacheKind


class SeqPlan(NamedTuple):
    """One request's work in a step. A named tuple, not a frozen dataclass: a step builds one per
    running request, and a frozen dataclass's __init__ (one object.__setattr__ per field) took 3 us
    of the 1 ms decision with 256 running; built positionally, a named tuple takes under 1 us."""
    request_id: str
    token_ids: tuple[int, ...]  # tokens whose cache entries this step writes
    start_pos: int  # position of token_ids[0]; equals the tokens already cached
    cache_kind: CacheKind
    block_table: tuple[int, ...]
    sample: bool  # the chunk ends the known tokens: sample the next one
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    sample_index: int = 0  # how many tokens were sampled before: seeds the per-token generator
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); -inf bans it
    logprobs: int | None = None  # return the sampled token's log-probability and the k most likely ones'
    # prompt tokens to score with their k most likely (prompt_logprobs): the tokens at start_pos + 1,
    # start_pos + 2, ..., each scored by the logits of the row before it
    prompt_logprobs: int | None = None
    prompt_targets: tuple[int, ...] = ()
    # OpenAI's penalties: each token's logit less presence_penalty if it is in the output, and
    # frequency_penalty per time it is; output_counts: () or (the output's distinct token ids, how
    # often each is there)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    output_counts: tuple = ()
    # where a grammar holds the output (aptray.structured_output) and this row samples: the tokens it
    # allows next, bit t % 32 of little-endian int32 word t // 32; empty: any token
    allowed_tokens: bytes = b""
    # transformers' repetition penalty (1: off) over seen_tokens, the distinct tokens of the prompt
    # and the output so far
    repetition_penalty: float = 1.0
    seen_tokens: tuple[int, ...] = ()

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start_pos > 0


# why a row failed when the request's structure, allowed_token_ids or bad_words ruled out every token:
# the request's own doing, not the server's (StepResult.client_errors)
NOTHING_ALLOWED = "the structured output, allowed_token_ids and bad_words leave no token to choose"


@dataclass(frozen=True)
class ConversionPlan:
    """Re-home a request's first num_tokens cache entries into another kind, before the step runs."""
    request_id: str
    num_tokens: int
    to_kind: CacheKind
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]


@dataclass(frozen=True)
class BatchPlan:
    iteration: int
    seqs: tuple[SeqPlan, ...] = ()
    conversions: tuple[ConversionPlan, ...] = ()
    want_logits: bool = False  # return the sampled rows' logits (tests, debugging)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs and not self.conversions


class TokenLogprobs(NamedTuple):
    """One output token's log-probability and the most likely tokens', most likely first, under the
    model's own distribution (log-softmax of its logits: before penalties, logit bias, temperature and
    filters, as vLLM's default raw_logprobs)."""
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)
    rank: int | None = None  # 1 + the tokens more likely than this one (None: not known)


@dataclass
class StepResult:
    sampled: dict[str, int] = field(default_factory=dict)  # request_id -> next token
    step_time: float = 0.0  # seconds the shards spent on the step
    logits: dict | None = None  # request_id -> logits row, when the plan asked
    errors: dict[str, str] = field(default_factory=dict)  # request_id -> why its row failed (that request only)
    # those of errors that are the request's own doing (a client error, NOTHING_ALLOWED), not the server's
    client_errors: set[str] = field(default_factory=set)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # request_id -> its token's, if it asked
    # request_id -> (position of the first scored prompt token, each target's TokenLogprobs)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
