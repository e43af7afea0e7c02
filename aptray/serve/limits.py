"""Admission limits: what one request may ask for, checked before it costs the server anything.

Everything here is refused with a 400 naming the parameter, so that a hostile or mistaken request
never reaches the engine thread, where a bad value (a token id outside the vocabulary, a seed or
top_k that overflows the shard contract's integers, an SLO no step can meet) would hurt others.

Two stages: `size_error` runs in the ingress before tokenizing or applying a chat template (their
cost grows with the input), `request_error` in the router on the token ids (it also guards
re-attaches, which skip the ingress's checks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# The sampler seeds a generator with seed * 1_000_003 + token index; it must fit in 64 bits.
SEED_LIMIT = 1 << 40
INT32_MAX = (1 << 31) - 1
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 512  # chat messages per request
# A prompt over this many characters per token of the prompt limit cannot fit the context (real
# tokenizers average 3-5 characters per token; 32 leaves room for long runs of whitespace or
# digits): refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 32


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

    def size_error(self, sampling: dict, prompt_chars: int = 0, num_token_ids: int = 0,
                   num_messages: int = 0) -> dict | None:
        """Refusal of what is too big to look at: before tokenizing, templates, or a vocabulary scan."""
        if num_messages > MAX_MESSAGES:
            return _err(f"{num_messages} messages, over the limit of {MAX_MESSAGES}", "messages")
        if prompt_chars > self.prompt_chars:
            return _err(f"the prompt has {prompt_chars} characters, more than a prompt of at most "
                        f"{self.prompt_tokens} tokens can have ({self.prompt_chars})",
                        "messages" if num_messages else "prompt")
        if num_token_ids > self.prompt_tokens:
            return _err(f"the prompt has {num_token_ids} tokens, over the limit of {self.prompt_tokens}", "prompt")
        return _sampling_size_error(sampling)

    def request_error(self, ids: list[int], sampling: dict) -> dict | None:
        """A refusal ({"error", "status", "param"}) or None."""
        n = len(ids)
        if n == 0:
            return _err("the prompt is empty", "prompt")
        if n > self.prompt_tokens:
            return _err(f"the prompt has {n} tokens, over the limit of {self.prompt_tokens}", "prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            return _err(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        max_tokens = sampling.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _err(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        if self.max_tokens_limit and max_tokens > self.max_tokens_limit:
            return _err(f"max_tokens is {max_tokens}, over this server's limit of {self.max_tokens_limit}",
                        "max_tokens")
        want = n + max_tokens
        if want > self.context:
            return _err(f"This model's maximum context length is {self.context} tokens. However, you requested "
                        f"{want} tokens ({n} in the prompt, {max_tokens} for max_tokens). Please reduce "
                        f"the prompt or max_tokens.", "max_tokens")
        seed = sampling.get("seed")
        if seed is not None and not -SEED_LIMIT <= seed <= SEED_LIMIT:
            return _err(f"seed must be within +-{SEED_LIMIT}", "seed")
        top_k = sampling.get("top_k", -1)
        if top_k is not None and top_k > INT32_MAX:
            return _err(f"top_k must be at most {INT32_MAX}", "top_k")
        return _sampling_size_error(sampling) or self._slo_error(sampling)

    def _slo_error(self, sampling: dict) -> dict | None:
        for name, floor in (("ttft", self.min_ttft_slo), ("tbt", self.min_tbt_slo)):
            value = sampling.get(f"{name}_slo")
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                return _err(f"{name}_ms must be a positive, finite number of milliseconds", f"{name}_ms")
            if value < floor:
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
    return None
