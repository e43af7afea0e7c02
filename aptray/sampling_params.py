"""What a client may ask of one generation: SamplingParams (vLLM's names and defaults) and the
prompt a model can take (check_prompt, check_token_ids).

InvalidRequest names the parameter at fault, so the offline API raises it as a ValueError and the
server answers 400 naming that parameter. What one pool or one policy cannot serve is checked
where that is known (Scheduler.add, Engine.add_request); a server's own limits (sizes,
max_tokens_limit, SLO floors) are aptray.serve.limits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aptray.structured_output import StructuredOutput

# Temperatures below this sample greedily (vLLM's rule): dividing logits by a vanishing temperature
# overflows to inf and makes the softmax NaN.
MIN_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias: +-100 bans or forces a token
MAX_LOGPROBS = 20  # most likely tokens a request may ask to see per output token (OpenAI's top_logprobs)
MAX_CACHE_SALT = 256  # characters of a cache_salt
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: +-2
# repetition_penalty in [0.01, 2] (1.0-1.5 in practice): a logit divided by a vanishing penalty is
# infinite, and the request's row then has no distribution to sample from
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 2.0


MAX_N = 1024  # output sequences of one prompt offline (a server's own limit is lower: serve/choices.py)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of output sequence `index` of a request of n: seed + index, so that each choice is
    its own draw and a seeded request repeats; None stays None (each choice draws freely)."""
    return None if seed is None else seed + index


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_text(text: str, *, param: str | None = None) -> str:
    """text, if it is Unicode text. A Python str (or JSON's escapes) can hold a lone surrogate
    ("\\ud800"), which no tokenizer, chat template or UTF-8 reply can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"not Unicode text: a lone surrogate at character {e.start}", param) from None
    return text


def check_continuation(continue_final_message: bool, add_generation_prompt: bool) -> None:
    """A conversation cannot both go on from its last message and open a new one."""
    if continue_final_message and add_generation_prompt:
        raise InvalidRequest("continue_final_message goes on from the last message: set add_generation_prompt to "
                             "false", "continue_final_message")


def check_prompt(ids, context: int, vocab_size: int, limit: int | None = None) -> None:
    """A prompt the model can take: not empty, leaving room to generate (and within `limit` tokens,
    a server's own limit), every id in the vocabulary."""
    n = len(ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
    if n >= context:
        raise InvalidRequest(f"the prompt has {n} tokens; the model context is {context}, which leaves no room "
                             f"to generate", "prompt")
    if limit and n > limit:
        raise InvalidRequest(f"the prompt has {n} tokens, over the limit of {limit}", "prompt")
    if not _in_vocabulary(ids, vocab_size):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size}) (integers)", "prompt")


def check_token_ids(sampling: SamplingParams, vocab_size: int) -> None:
    """Token ids the request names (stop_token_ids, logit_bias, allowed_token_ids) are the model's: one outside the
    vocabulary can never match, so a request naming one asked for something else (another model's
    ids, a sign error)."""
    for name, what, ids in (("stop_token_ids", "stop_token_ids", sampling.stop_token_ids),
                            ("logit_bias", "logit_bias keys", sampling.logit_bias),
                            ("allowed_token_ids", "allowed_token_ids", sampling.allowed_token_ids or ())):
        if not _in_vocabulary(ids, vocab_size):
            raise InvalidRequest(f"{what} must be in [0, {vocab_size}) (token ids)", name)


def bad_words_token_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of bad_words, each word as written and after a space (how it reads after
    another word), without repeats."""
    if words and tokenizer is None:
        raise InvalidRequest("bad_words need the model's tokenizer (skip_tokenizer_init is set)", "bad_words")
    seqs = {}
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                seqs[ids] = None
    return tuple(seqs)


def check_cache_salt(salt) -> None:
    if salt is not None and (not isinstance(salt, str) or not 1 <= len(salt) <= MAX_CACHE_SALT):
        raise InvalidRequest(f"cache_salt must be 1-{MAX_CACHE_SALT} characters", "cache_salt")


def _in_vocabulary(ids, vocab_size: int) -> bool:
    return all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)


@dataclass
class SamplingParams:
    # output sequences of the prompt (vLLM's): the offline LLM runs each as a request of its own,
    # seeded seed + i where seeded (choice_seed); the engine takes one sequence per request
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one's probability
    min_tokens: int = 0  # outputs before EOS, a stop token id or a stop string may end it
    # token id -> added to its logit before sampling (OpenAI's logit_bias); JSON's string keys are taken
    logit_bias: dict[int, float] = field(default_factory=dict)
    # OpenAI's: subtracted from a token's logit once it is in the output, and per time it is there
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' and vLLM's: a token already in the prompt or the output has its logit divided by
    # this where positive, multiplied where negative (1: off)
    repetition_penalty: float = 1.0
    # None: no log-probabilities; k >= 0: each output token's, with the k most likely tokens' (vLLM's logprobs)
    logprobs: int | None = None
    # the same for each prompt token after the first (vLLM's prompt_logprobs; the prompt is then computed
    # whole: no prefix cache)
    prompt_logprobs: int | None = None
    # the output held to a JSON schema, a regex, a list of choices or a grammar (aptray.structured_output)
    structured_output: StructuredOutput | None = None
    # False: special tokens (a chat model's tool-call markers, say) show in the text (vLLM's)
    skip_special_tokens: bool = True
    # True: the text keeps the stop string, or the text of the token (EOS, a stop token id), that
    # ended it; False: cut before it (vLLM's)
    include_stop_str_in_output: bool = False
    # requests share cached prefix blocks only with requests of the same salt (vLLM's cache_salt: a
    # tenant's prompts cannot be probed by timing another's); None: the shared cache
    cache_salt: str | None = None
    # the only tokens it may sample (vLLM's allowed_token_ids); None: any
    allowed_token_ids: list[int] | None = None
    # words the output never has (vLLM's bad_words): each word's tokens, with and without a leading
    # space (bad_words_token_ids); its last token is banned where the output ends with the others
    bad_words: list[str] = field(default_factory=list)
    # Per-request SLOs in seconds; None takes the engine's defaults.
    ttft_slo: float | None = None
    tbt_slo: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        check_cache_salt(self.cache_salt)
        if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) and w.strip()
                                                                      for w in self.bad_words):
            raise InvalidRequest("bad_words must be a list of words (not empty, not only spaces)", "bad_words")
        self.bad_words = list(self.bad_words)
        if self.allowed_token_ids is not None and (not isinstance(self.allowed_token_ids, (list, tuple))
                                                   or not self.allowed_token_ids):
            raise InvalidRequest("allowed_token_ids must be a non-empty list of token ids", "allowed_token_ids")
        for name in ("skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be an integer in [1, {MAX_N}], got {self.n!r}", "n")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k < 2**31:
            raise InvalidRequest(f"top_k must be -1 (off) or a positive integer below 2**31, got {self.top_k!r}",
                                 "top_k")
        # the sampler seeds a generator with seed * 1_000_003 + token index: it must fit in 64 bits
        if self.seed is not None and (not isinstance(self.seed, int) or abs(self.seed) > 2**40):
            raise InvalidRequest(f"seed must be an integer within +-2**40, got {self.seed!r}", "seed")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be an integer in [0, max_tokens = {self.max_tokens}], got "
                                 f"{self.min_tokens!r}", "min_tokens")
        self.logit_bias = _logit_bias(self.logit_bias)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not -MAX_PENALTY <= value <= MAX_PENALTY):
                raise InvalidRequest(f"{name} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}",
                                     name)
        r = self.repetition_penalty
        if (isinstance(r, bool) or not isinstance(r, (int, float))
                or not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY):
            raise InvalidRequest(f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY:g}, "
                                 f"{MAX_REPETITION_PENALTY:g}], got {r!r}", "repetition_penalty")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise InvalidRequest(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (how many of the most likely "
                                     f"tokens to return), got {k!r}", name)
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty", "stop")
        if any(not isinstance(t, int) for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be integers", "stop_token_ids")
        if self.structured_output is not None:
            self._check_structured_output()
        for name in ("ttft_slo", "tbt_slo"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise InvalidRequest(f"{name} must be a positive, finite number of seconds, got {value}",
                                     f"{name[:-4]}_ms")

    def _check_structured_output(self) -> None:
        from aptray.structured_output import PARAM, as_structured_output
        self.structured_output = as_structured_output(self.structured_output)
        # the grammar decides where the output ends: EOS is the one token a complete grammar allows
        if self.min_tokens:
            raise InvalidRequest("min_tokens cannot be combined with a structured output: the grammar decides "
                                 "where the output ends", PARAM)
        if self.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with a structured output: EOS ends the output "
                                 "once the grammar is complete", PARAM)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def _logit_bias(bias) -> dict[int, float]:
    """{token id: bias} with int ids (a JSON object's keys are strings: "42" is 42) and finite biases
    within +-MAX_LOGIT_BIAS."""
    if not isinstance(bias, dict):
        raise InvalidRequest("logit_bias must be an object of token id -> bias", "logit_bias")
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.isascii() and key.isdigit():
            key = int(key)
        if not isinstance(key, int) or isinstance(key, bool):
            raise InvalidRequest(f"logit_bias keys must be token ids (integers), got {key!r}", "logit_bias")
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise InvalidRequest(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                 f"got {value!r} for token {key}", "logit_bias")
        out[key] = float(value)
    return out
