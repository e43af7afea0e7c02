"""Request: one generation's state as the engine and scheduler see it (torch-free)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from aptray.sampling_params import SamplingParams


class CacheKind(str, enum.Enum):
    """What a request keeps per layer: K and V, or the attention input (hidden state).

    The value ("kv", "hidden") is what plans and the shard proto carry; `code` is the small integer
    numpy selection arrays hold (0 stands for none), KIND_OF_CODE maps it back."""
    KV = "kv", 1
    HIDDEN = "hidden", 2

    def __new__(cls, value: str, code: int):
        kind = str.__new__(cls, value)
        kind._value_ = value
        kind.code = code
        return kind


KIND_OF_CODE: dict[int, CacheKind] = {kind.code: kind for kind in CacheKind}


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # something went wrong for this request alone (its `error` says what)

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


def token_mask(token_ids, vocab_size: int) -> bytes:
    """token_ids as SeqPlan.allowed_tokens: bit t % 32 of little-endian 32-bit word t // 32, one word
    per 32 tokens of the vocabulary (a grammar's mask has the same layout)."""
    bits = np.zeros(-(-vocab_size // 32) * 32, dtype=np.uint8)
    bits[list(token_ids)] = 1
    return np.packbits(bits, bitorder="little").tobytes()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    ttft_slo: float
    tbt_slo: float
    eos_token_id: int | None = None
    guide: object | None = None  # where a grammar holds the output: its aptray.structured_output.Guide
    # sampling.allowed_token_ids as SeqPlan.allowed_tokens (token_mask), b"": any token
    allowed_mask: bytes = b""
    # sampling.bad_words' token sequences (sampling_params.bad_words_token_ids): one-token ones are
    # banned in logit_bias; each longer one bans its last token where the output ends with the others
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    _bad_word_seqs: tuple[tuple[int, ...], ...] = field(default=(), repr=False)  # those of two tokens or more
    output_token_ids: list[int] = field(default_factory=list)
    # each output token's TokenLogprobs where sampling.logprobs asks (None: a token sampled elsewhere,
    # before a resume, or by an executor that reports none)
    output_logprobs: list = field(default_factory=list)
    # where sampling.prompt_logprobs asks: one per prompt token (the first, and any not computed yet: None)
    prompt_logprobs: list = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    cache_kind: CacheKind | None = None
    num_computed_tokens: int = 0  # tokens whose cache entries are written
    # prompt tokens its first admission found in the prefix cache (vLLM's; None: not admitted yet)
    num_cached_tokens: int | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    stop_reason: str | int | None = None
    error: str | None = None  # why it ended with FINISHED_ERROR
    stop_token_set: frozenset[int] = frozenset()  # sampling.stop_token_ids: an O(1) check per token
    # what each step adds to its logits (SeqPlan.logit_bias): sampling.logit_bias as (id, bias) pairs,
    # and until min_tokens outputs the same with every token that would end it (EOS, stop ids) at -inf
    logit_bias: tuple[tuple[int, float], ...] = ()
    early_logit_bias: tuple[tuple[int, float], ...] = ()
    # the prefix cache's keys of its full blocks, per kind (aptray.cache.block_hash), grown as needed
    block_keys: dict = field(default_factory=dict, repr=False)
    # where sampling has a penalty: how often each token is in the first _counted outputs, in the order
    # first seen (output_counts, seen_tokens); the prompt's distinct tokens, where it is a repetition penalty
    _output_counts: dict = field(default_factory=dict, repr=False)
    _counted: int = field(default=0, repr=False)
    _prompt_seen: dict | None = field(default=None, repr=False)
    # a decode's SeqPlan fields from min_p on, where they never change (no min_tokens, no penalties): the
    # scheduler's hottest line appends them whole (Scheduler._decode_plan)
    decode_tail: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        sp = self.sampling
        self.stop_token_set = frozenset(sp.stop_token_ids)
        banned = dict.fromkeys(sorted({w[0] for w in self.bad_words_ids if len(w) == 1}), -math.inf)
        self.logit_bias = self.early_logit_bias = tuple({**sp.logit_bias, **banned}.items())
        self._bad_word_seqs = tuple(w for w in self.bad_words_ids if len(w) > 1)
        if sp.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
        if sp.min_tokens:
            ending = set(self.stop_token_set)
            if self.eos_token_id is not None and not sp.ignore_eos:
                ending.add(self.eos_token_id)
            self.early_logit_bias = tuple({**dict(self.logit_bias), **dict.fromkeys(sorted(ending), -math.inf)}.items())
        elif not sp.penalized and self.guide is None and sp.repetition_penalty == 1.0 and not self._bad_word_seqs:
            self.decode_tail = (sp.min_p, self.logit_bias, sp.logprobs, None, (), sp.presence_penalty,
                                sp.frequency_penalty, (), self.allowed_mask, 1.0, ())

    def step_logit_bias(self, num_outputs: int) -> tuple[tuple[int, float], ...]:
        """What the step sampling output number num_outputs + 1 adds to its logits."""
        bias = self.early_logit_bias if num_outputs < self.sampling.min_tokens else self.logit_bias
        if not self._bad_word_seqs:
            return bias
        out = self.output_token_ids[:num_outputs]
        ends = [w[-1] for w in self._bad_word_seqs
                if len(w) - 1 <= len(out) and tuple(out[len(out) - len(w) + 1:]) == w[:-1]]
        return bias + tuple((t, -math.inf) for t in ends) if ends else bias

    def output_counts(self) -> tuple:
        """(the output's distinct token ids, how often each is there), SeqPlan.output_counts, where
        sampling is penalized and there is an output; else ()."""
        if not self.sampling.penalized or not self.output_token_ids:
            return ()
        counts = self._counts()
        return tuple(counts), tuple(counts.values())

    def seen_tokens(self) -> tuple[int, ...]:
        """SeqPlan.seen_tokens: the distinct tokens of the prompt and the output, in the order first
        seen, where sampling has a repetition penalty; else ()."""
        if self.sampling.repetition_penalty == 1.0:
            return ()
        if self._prompt_seen is None:
            self._prompt_seen = dict.fromkeys(self.prompt_token_ids)
        return tuple({**self._prompt_seen, **self._counts()})

    def _counts(self) -> dict:
        """How often each token is in the output, counted as the output grows."""
        counts, outputs = self._output_counts, self.output_token_ids
        if self._counted > len(outputs):  # the outputs were replaced (a resume): count again
            counts.clear()
            self._counted = 0
        for t in outputs[self._counted:]:
            counts[t] = counts.get(t, 0) + 1
        self._counted = len(outputs)
        return counts

    def allowed_tokens(self) -> bytes:
        """SeqPlan.allowed_tokens for its next token: what its grammar and its allowed_token_ids allow,
        or b"" (any)."""
        if self.guide is None:
            return self.allowed_mask
        grammar = self.guide.allowed_tokens()
        if not self.allowed_mask:
            return grammar
        return np.bitwise_and(np.frombuffer(grammar, np.uint8), np.frombuffer(self.allowed_mask, np.uint8)).tobytes()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token still lacks cache entries (new, preempted, or mid chunked prefill)."""
        return self.num_uncomputed_tokens > 1 or not self.output_token_ids

    def record_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.token_times.append(now)
