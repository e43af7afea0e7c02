"""What generate() and the engine's step() hand back (vLLM's shapes)."""
from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # while running: the request's live list (copy it to keep it)
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None
    # where SamplingParams.logprobs asks: each token's aptray.plan.TokenLogprobs (None where unknown,
    # for tokens sampled before a resume); while running, the request's live list too
    logprobs: list | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None  # on the finished output only
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by this step (streaming)
    error: str | None = None  # finish_reason "error": what went wrong for this request
    # where SamplingParams.prompt_logprobs asks: one aptray.plan.TokenLogprobs per prompt token (None
    # for the first, which nothing predicts); complete from the first output on
    prompt_logprobs: list | None = None
    # prompt tokens its first admission found in the prefix cache (vLLM's); None before it
    num_cached_tokens: int | None = None
    error_from_request: bool = False  # an error of the request's own doing (its structure, its filters)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_byte_token_ids: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_anchors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _per_tokenizer(cache: "weakref.WeakKeyDictionary", tokenizer, make, fallback):
    """cache's value for tokenizer, made once by make(tokenizer); fallback for an object that cannot be
    weakly referenced (not a real tokenizer)."""
    try:
        return cache[tokenizer]
    except KeyError:
        value = cache[tokenizer] = make(tokenizer)
        return value
    except TypeError:
        return fallback


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte-fallback tokens (<0x00>..<0xFF>); empty for byte-level BPE."""
    def make(tok) -> frozenset[int]:
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        return frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))
    return _per_tokenizer(_byte_token_ids, tokenizer, make, frozenset())


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each character a token is spelt with -> the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


def _anchor(tokenizer) -> tuple[list[int], str]:
    """A plain letter's token ids and text, for decoding after it (empty where there is none)."""
    def make(tok) -> tuple[list[int], str]:
        ids = tok.encode("a", add_special_tokens=False)
        return ids, tok.decode(ids)
    return _per_tokenizer(_anchors, tokenizer, make, ([], ""))


def decode_continuing(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """ids' text as it reads after other text: tokenizer.decode, except that the first token keeps the
    space a SentencePiece piece begins with ("▁Paris"), which a decode strips at the start of its
    text. An output's text so joins its prompt's with the space between them, as vLLM's does (it
    decodes after the prompt's last tokens). Decoded after a plain letter, which is then cut off."""
    anchor, anchor_text = _anchor(tokenizer)
    if anchor_text:
        text = tokenizer.decode(anchor + list(ids), skip_special_tokens=skip_special_tokens)
        if text.startswith(anchor_text):
            return text[len(anchor_text):]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def token_text(tokenizer, token_id: int) -> str:
    """A token's text as log-probabilities show it (OpenAI's `token`): as it reads inside a text, so
    the tokens' texts join into the output's (a SentencePiece "▁the" reads " the")."""
    return decode_continuing(tokenizer, [token_id], skip_special_tokens=False)


def token_bytes(tokenizer, token_id: int, text: str | None = None) -> bytes:
    """The bytes a token stands for (OpenAI's logprobs `bytes`, from which a client rebuilds the text):
    its text's UTF-8, or, where the token is part of a character (its text alone decodes to U+FFFD),
    its own bytes: each character of a byte-level BPE token stands for one byte, a SentencePiece
    byte-fallback token (<0xE6>) for its byte. text: its token_text, where the caller has it."""
    if text is None:
        text = token_text(tokenizer, token_id)
    if "\ufffd" not in text:
        return text.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and _BYTE_TOKEN.fullmatch(piece):
        return bytes([int(piece[3:5], 16)])
    alphabet = _byte_level_alphabet()
    if isinstance(piece, str) and piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return text.encode()


class IncrementalDetokenizer:
    """Streaming text of a growing token list, O(1) tokens decoded per new token (vLLM/TGI style).

    Decoding the whole output at every token costs O(n^2) over a request. Instead a short window is
    decoded: tokens[prefix:read] is text already emitted, tokens[prefix:] the same plus the new
    tokens; the new text is the difference. The window only moves on after text that ends in a
    whole character, so a multi-byte character split over tokens is held back until complete (its
    partial decode ends in U+FFFD), and words keep the spaces a SentencePiece decoder strips at the
    start of a decode (the first token's too: decode_continuing). A run of SentencePiece byte-fallback
    tokens is held back until it ends: its decoder renders the run as a whole, so a later byte can
    change how earlier ones read. The concatenated deltas are a prefix of decode_continuing(all
    tokens); `finish` returns what is left (e.g. a trailing incomplete character, which the full
    decode shows as U+FFFD).

    tokenizers' own DecodeStream (tokenizers 0.23) is not exact for these: its chunks can differ from
    the full decode where a split character or a byte-fallback run spans its steps."""

    __slots__ = ("tokenizer", "skip_special_tokens", "token_ids", "text", "_prefix", "_read", "_bytes", "_skipped")

    def __init__(self, tokenizer, token_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._bytes = byte_fallback_ids(tokenizer)
        self._skipped = frozenset(getattr(tokenizer, "all_special_ids", ()) if skip_special_tokens else ())
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = self._read = 0
        if token_ids:
            self.add(token_ids)

    def _decode(self, ids: list[int]) -> str:
        """A window's text: from the output's first token, as it reads after its prompt
        (decode_continuing); from a later one, a plain decode (the space a SentencePiece decode strips
        at its start goes from both texts of the window alike)."""
        if self._prefix == 0:
            return decode_continuing(self.tokenizer, ids, self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; returns the text they complete (may be empty while a character is split)."""
        self.token_ids.extend(new_token_ids)
        if self._bytes and self._in_byte_run():
            return ""
        prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        window = self._decode(self.token_ids[self._prefix:])
        if len(window) <= len(prefix_text) or window.endswith("\ufffd") or not window.startswith(prefix_text):
            return ""  # nothing new yet, or an incomplete character: wait for the next token
        delta = window[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.token_ids)
        self.text += delta
        return delta

    def _in_byte_run(self) -> bool:
        """Whether the last token that shows (skipped special tokens do not) is a byte token."""
        for t in reversed(self.token_ids):
            if t not in self._skipped:
                return t in self._bytes
        return False

    def finish(self) -> str:
        """The rest of decode_continuing(all tokens) after what was emitted ("" if it does not extend it)."""
        full = decode_continuing(self.tokenizer, self.token_ids, self.skip_special_tokens)
        if not full.startswith(self.text):
            return ""
        delta, self.text = full[len(self.text):], full
        return delta
