"""Stop rules: when a request's output ends, and where its text is cut.

One StopChecker per request applies them token by token: EOS (unless ignore_eos), a stop token
id, a stop string completed by the new token's text (none of these within the first min_tokens
outputs), max_tokens, the model's context. The engine runs it as tokens come; a resumed request
replays its tokens through a fresh one (whose finish was lost with a fault), so both decide alike.
Stop strings are searched only in the text the new token can complete, decoded incrementally: O(1)
tokens decoded per token. The output's text (final_text) is cut before the stop string, and leaves
out the token that ended it (EOS or a stop token id), as vLLM's does; include_stop_str_in_output
keeps either.
"""
from __future__ import annotations

from aptray.outputs import IncrementalDetokenizer, decode_continuing
from aptray.request import RequestStatus
from aptray.sampling_params import SamplingParams


def stop_holdback(stops: list[str]) -> int:
    """Characters of streamed text to hold back: they could still become the start of a stop string."""
    return max(map(len, stops)) - 1 if stops else 0


class StopChecker:
    def __init__(self, sampling: SamplingParams, eos_token_id: int | None, max_model_len: int, tokenizer=None,
                 prior_output_ids: list[int] = ()):
        """prior_output_ids: outputs already checked (a resumed request's): searched no more."""
        self.sampling, self.eos, self.max_model_len, self.tokenizer = sampling, eos_token_id, max_model_len, tokenizer
        self.stop_ids = frozenset(sampling.stop_token_ids)
        self._prior = list(prior_output_ids)
        self._detok: IncrementalDetokenizer | None = None  # made at the first token, if there are stop strings
        self.stop_reason: str | int | None = None  # the stop string or token id that ended it
        self.text: str | None = None  # the output's text cut before the stop string, when one ended it
        self.ended_by_token = False  # EOS or a stop token id ended it: that token has no text

    def check(self, token: int, num_outputs: int, num_tokens: int) -> RequestStatus | None:
        """After the output got `token` (now num_outputs long; prompt + output num_tokens): the
        status that ends it, or None."""
        sp = self.sampling
        may_stop = num_outputs > sp.min_tokens  # vLLM's rule: the first min_tokens outputs end nothing
        if may_stop and not sp.ignore_eos and token == self.eos:
            self.ended_by_token = True
            return RequestStatus.FINISHED_STOPPED
        if may_stop and token in self.stop_ids:
            self.stop_reason, self.ended_by_token = token, True
            return RequestStatus.FINISHED_STOPPED
        if sp.stop and self.tokenizer is not None and self._stop_string(token, may_stop):
            return RequestStatus.FINISHED_STOPPED
        if num_outputs >= sp.max_tokens or num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _stop_string(self, token: int, search: bool) -> bool:
        """Whether the text token adds completes a stop string (searched for only when `search`: the
        text is decoded either way)."""
        if self._detok is None:
            self._detok = IncrementalDetokenizer(self.tokenizer, self._prior, self.sampling.skip_special_tokens)
        delta = self._detok.add([token])
        if not delta or not search:
            return False
        text = self._detok.text
        for s in self.sampling.stop:
            at = text.find(s, max(0, len(text) - len(delta) - len(s) + 1))
            if at >= 0:
                end = at + len(s) if self.sampling.include_stop_str_in_output else at
                self.stop_reason, self.text = s, text[:end]
                return True
        return False

    def final_text(self, output_ids: list[int]) -> str:
        """The text of a finished output (of output_ids, all its tokens): cut before the stop string
        that ended it, or without the token that did (unless include_stop_str_in_output); "" without
        a tokenizer."""
        if self.text is not None:
            return self.text
        if self.tokenizer is None:
            return ""
        ids = output_ids[:-1] if self.ended_by_token and not self.sampling.include_stop_str_in_output else output_ids
        return decode_continuing(self.tokenizer, ids, self.sampling.skip_special_tokens)

    def replay(self, output_ids: list[int], prompt_len: int) -> RequestStatus | None:
        """Check a whole output token by token (a fresh checker): the status that ended it, if any."""
        for i, token in enumerate(output_ids):
            status = self.check(token, i + 1, prompt_len + i + 1)
            if status is not None:
                return status
        return None
