"""Admission limits: what one request may ask for, checked before it is accepted.

Everything here is refused with a 400 naming the parameter, so that a hostile or mistaken
request never reaches the engine thread, where a bad value (a token id outside the vocabulary,
a seed or top_k that overflows the shard contract's integers) would fail a whole batch.
"""
from __future__ import annotations

# The sampler seeds a generator with seed * 1_000_003 + token index; it must fit in 64 bits.
SEED_LIMIT = 1 << 40
INT32_MAX = (1 << 31) - 1
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256


def _err(message: str, param: str) -> dict:
    return {"error": message, "status": 400, "param": param}


def request_error(ids: list[int], sampling: dict, context: int, vocab_size: int,
                  max_prompt_tokens: int | None, max_tokens_limit: int | None) -> dict | None:
    """A refusal ({"error", "status", "param"}) or None."""
    n = len(ids)
    if n == 0:
        return _err("the prompt is empty", "prompt")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        return _err(f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
    prompt_limit = min(max_prompt_tokens or context - 1, context - 1)
    if n > prompt_limit:
        return _err(f"the prompt has {n} tokens, over the limit of {prompt_limit}", "prompt")
    max_tokens = sampling.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        return _err(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    if max_tokens_limit and max_tokens > max_tokens_limit:
        return _err(f"max_tokens is {max_tokens}, over this server's limit of {max_tokens_limit}", "max_tokens")
    want = n + max_tokens
    if want > context:
        return _err(f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{want} tokens ({n} in the prompt, {max_tokens} for max_tokens). Please reduce "
                    f"the prompt or max_tokens.", "max_tokens")
    seed = sampling.get("seed")
    if seed is not None and not -SEED_LIMIT <= seed <= SEED_LIMIT:
        return _err(f"seed must be within +-{SEED_LIMIT}", "seed")
    top_k = sampling.get("top_k", -1)
    if top_k is not None and top_k > INT32_MAX:
        return _err(f"top_k must be at most {INT32_MAX}", "top_k")
    stop = sampling.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        return _err(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    return None
