"""What makes a request invalid, in one place: InvalidRequest names the parameter at fault, so
the offline API raises it as a ValueError and the server answers 400 naming that parameter.

The checks of a model's prompt live here (check_prompt); the ranges of sampling values live in
SamplingParams, which raises InvalidRequest too; what one pool or one policy cannot serve is
checked where that is known (Scheduler.add, Engine.add_request); a server's own limits (sizes,
max_tokens_limit, SLO floors) are aptray.serve.limits.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise InvalidRequest(f"prompt token ids must be in [0, {vocab_size}) (integers)", "prompt")
