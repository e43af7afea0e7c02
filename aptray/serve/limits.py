"""Admission limits: what one request may ask for, checked before it costs the server anything.

Everything here is refused with a 400 naming the parameter, so that a hostile or mistaken request
never reaches the engine thread, where a bad value (a token id outside the vocabulary, a seed or
top_k that overflows the shard contract's integers, an SLO no step can meet) would hurt others.

Two stages: `size_error` runs in the ingress before tokenizing or applying a chat template (their
cost grows with the input), `admit` in the router on the token ids (it also guards re-attaches,
which skip the ingress's checks): the model's own rules (aptray.sampling_params: check_prompt,
SamplingParams, check_token_ids), then this server's limits.
"""
from __future__ import annotations

from dataclasses import dataclass

from aptray.sampling_params import InvalidRequest, SamplingParams, check_prompt, check_token_ids

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_BAD_WORDS = 64  # and MAX_STOP_CHARS characters each
MAX_ALLOWED_TOKEN_IDS = 65_536  # a mask of the vocabulary is made of them once per request
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit: every step of the request carries them
MAX_MESSAGES = 512  # chat messages per request
# A prompt over this many characters per token of the prompt limit cannot fit the context (real
# tokenizers average 3-5 characters per token; 32 leaves room for long runs of whitespace or
# digits): refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 32
# a prompt the client asks to truncate (truncate_prompt_tokens) may be this many times longer, so its
# tokenizing on the ingress's one tokenizer thread stays short: the demo tokenizer takes 5.3 ms for a
# longest prompt, 24.8 ms for 4 times that, 556 ms for the body limit's 1 MiB (python -m
# loadgen.bench_tokenize, 2026-12-07 06:53)
TRUNCATED_PROMPT_FACTOR = 4


def _err(message: str, param: str) -> dict:
    return {"error": message, "status": 400, "param": param}


@dataclass(frozen=True)
class RequestLimits:
    context: int  # the model's context, in tokens
    vocab_size: int
    max_prompt_tokens: int | None = None  # None: the context minus one
    max_tokens_limit: int | None = None  # None: what the context leaves
    min_ttft_slo: float = 0.0  # seconds: SLOs below these are refused (no step is that fast)
    min_tbt_slo: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return min(self.max_prompt_tokens or self.context - 1, self.context - 1)

    @property
    def prompt_chars(self) -> int:
        return self.prompt_tokens * MAX_CHARS_PER_TOKEN

    def kept_tokens(self, truncate: int | None) -> int | None:
        """The prompt tokens truncate_prompt_tokens keeps (its last ones): None for all; -1 for as many
        as a prompt may have here. InvalidRequest for another value below 1."""
        if truncate is None:
            return None
        if truncate == -1:
            return self.prompt_tokens
        if not isinstance(truncate, int) or truncate < 1:
            raise InvalidRequest(f"truncate_prompt_tokens must be -1 or a positive number of tokens, got {truncate}",
                                 "truncate_prompt_tokens")
        return truncate

    def size_error(self, sampling: dict, prompt_chars: int = 0, num_token_ids: int = 0,
                   num_messages: int = 0, truncated: bool = False) -> dict | None:
        """Refusal of what is too big to look at: before tokenizing, templates, or a vocabulary scan.
        truncated: the prompt is to be cut to its last tokens (TRUNCATED_PROMPT_FACTOR)."""
        if num_messages > MAX_MESSAGES:
            return _err(f"{num_messages} messages, over the limit of {MAX_MESSAGES}", "messages")
        where = "messages" if num_messages else "prompt"
        if truncated:
            limit = self.prompt_chars * TRUNCATED_PROMPT_FACTOR
            if prompt_chars > limit:
                return _err(f"the prompt has {prompt_chars} characters, over the limit of {limit} for a prompt to "
                            f"truncate", where)
            return _sampling_size_error(sampling)
        if prompt_chars > self.prompt_chars:
            return _err(f"the prompt has {prompt_chars} characters, more than a prompt of at most "
                        f"{self.prompt_tokens} tokens can have ({self.prompt_chars})", where)
        if num_token_ids > self.prompt_tokens:
            return _err(f"the prompt has {num_token_ids} tokens, over the limit of {self.prompt_tokens}", "prompt")
        return _sampling_size_error(sampling)

    def admit(self, ids: list[int], sampling: dict) -> tuple[dict | None, SamplingParams | None]:
        """(refusal {"error", "status", "param"}, None) or (None, the request's SamplingParams): the
        model's rules (check_prompt, SamplingParams, check_token_ids) and this server's limits."""
        try:
            check_prompt(ids, self.context, self.vocab_size, self.max_prompt_tokens)
            refusal = _sampling_size_error(sampling)
            if refusal is not None:
                return refusal, None
            sp = SamplingParams(**sampling)
            check_token_ids(sp, self.vocab_size)
        except InvalidRequest as e:
            return _err(str(e), e.param), None
        except TypeError as e:  # a field SamplingParams does not have
            return _err(str(e), None), None
        refusal = self._server_error(len(ids), sp)
        return (refusal, None) if refusal is not None else (None, sp)

    def _server_error(self, n: int, sp: SamplingParams) -> dict | None:
        if self.max_tokens_limit and sp.max_tokens > self.max_tokens_limit:
            return _err(f"max_tokens is {sp.max_tokens}, over this server's limit of {self.max_tokens_limit}",
                        "max_tokens")
        want = n + sp.max_tokens
        if want > self.context:
            return _err(f"This model's maximum context length is {self.context} tokens. However, you requested "
                        f"{want} tokens ({n} in the prompt, {sp.max_tokens} for max_tokens). Please reduce "
                        f"the prompt or max_tokens.", "max_tokens")
        for name, value, floor in (("ttft", sp.ttft_slo, self.min_ttft_slo), ("tbt", sp.tbt_slo, self.min_tbt_slo)):
            if value is not None and value < floor:
                return _err(f"{name}_ms is {value * 1e3:.4g} ms, below this server's floor of {floor * 1e3:.4g} ms "
                            f"(no step of this engine is that fast)", f"{name}_ms")
        return None


def _sampling_size_error(sampling: dict) -> dict | None:
    stop = sampling.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        return _err(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    if len(sampling.get("stop_token_ids") or ()) > MAX_STOP_TOKEN_IDS:
        return _err(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids", "stop_token_ids")
    words = sampling.get("bad_words") or []
    if len(words) > MAX_BAD_WORDS or any(not isinstance(w, str) or len(w) > MAX_STOP_CHARS for w in words):
        return _err(f"at most {MAX_BAD_WORDS} bad_words of at most {MAX_STOP_CHARS} characters", "bad_words")
    if len(sampling.get("allowed_token_ids") or ()) > MAX_ALLOWED_TOKEN_IDS:
        return _err(f"at most {MAX_ALLOWED_TOKEN_IDS} allowed_token_ids", "allowed_token_ids")
    bias = sampling.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS_TOKENS:
        return _err(f"logit_bias names {len(bias)} tokens, over the limit of {MAX_LOGIT_BIAS_TOKENS}", "logit_bias")
    return None
