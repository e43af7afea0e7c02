"""Structured outputs: an output held to a JSON schema, to any JSON object, to a regular expression,
to one of a list of strings, or to an EBNF grammar (OpenAI's response_format, vLLM's
structured_outputs).

StructuredOutput is what a request asks; it is checked with the other sampling parameters and
stays torch-free. Grammars compiles it for one tokenizer with xgrammar (the grammar engine vLLM
and SGLang use), and a Guide follows one request's output: before each sampled token it gives the
tokens the grammar allows next as a bitmask (SeqPlan.allowed_tokens, which the sampler applies),
and it takes each token sampled. The output ends when the grammar is complete and the model
samples EOS, the only token then allowed. xgrammar, and torch with it, loads at the first
structured request.

JSON is compiled compact (xgrammar's any_whitespace=False): a separator is ", " or ": " and
nothing else, so a model cannot spend its tokens on whitespace.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aptray.sampling_params import InvalidRequest, check_text

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 65_536  # a schema, regex or grammar's text, or all the choices together
MAX_CHOICES = 1024
PARAM = "structured_outputs"


@dataclass(frozen=True)
class StructuredOutput:
    """kind "json": spec is a JSON schema as JSON text; "json_object": any JSON object (spec "");
    "regex": a regular expression the whole output matches; "choice": spec is the strings, the output
    is one of them; "grammar": an EBNF grammar (xgrammar's GBNF dialect, rule `root` first)."""
    kind: str
    spec: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"a structured output's kind is one of {', '.join(KINDS)}, got {self.kind!r}", PARAM)
        if self.kind == "choice":
            self._check_choices()
        elif not isinstance(self.spec, str):
            raise InvalidRequest(f"a structured output of kind {self.kind!r} takes a string", PARAM)
        elif self.kind == "json_object" and self.spec:
            raise InvalidRequest("a json_object structured output takes no schema (use kind \"json\")", PARAM)
        elif self.kind != "json_object":
            self._check_text(self.spec)
        if self.kind == "json":
            try:
                schema = json.loads(self.spec)
            except (ValueError, RecursionError):
                raise InvalidRequest("the JSON schema is not valid JSON", PARAM) from None
            if not isinstance(schema, dict):
                raise InvalidRequest("a JSON schema is a JSON object", PARAM)

    def _check_choices(self) -> None:
        choices = self.spec
        if isinstance(choices, list):  # as JSON and Redis give it back
            object.__setattr__(self, "spec", choices := tuple(choices))
        if not isinstance(choices, tuple) or not 1 <= len(choices) <= MAX_CHOICES:
            raise InvalidRequest(f"a choice structured output takes 1 to {MAX_CHOICES} strings", PARAM)
        if any(not isinstance(c, str) or not c for c in choices):
            raise InvalidRequest("each choice is a non-empty string", PARAM)
        self._check_text("".join(choices))

    @staticmethod
    def _check_text(text: str) -> None:
        if not text:
            raise InvalidRequest("a structured output's schema, regex or grammar is empty", PARAM)
        if len(text) > MAX_SPEC_CHARS:
            raise InvalidRequest(f"a structured output's text is {len(text)} characters, over the limit of "
                                 f"{MAX_SPEC_CHARS}", PARAM)
        check_text(text, param=PARAM)


def as_structured_output(value) -> StructuredOutput | None:
    """value as a StructuredOutput: None, one already, or its fields as a dict (dataclasses.asdict,
    and so a Redis record, gives a dict)."""
    if value is None or isinstance(value, StructuredOutput):
        return value
    if isinstance(value, dict) and set(value) <= {"kind", "spec"} and "kind" in value:
        return StructuredOutput(**value)
    raise InvalidRequest("structured_output must be a StructuredOutput or {kind, spec}", PARAM)


# xgrammar's errors start with a log prefix: "[23:07:00] /project/cpp/regex_converter.cc:94: "
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


# xgrammar 0.2.9 writes each character of a string with minLength or maxLength as [^"\\\r\n]: a raw
# control character in (invalid JSON), every escape out (xgrammar issue #800). Such a character is
# then one JSON string character: a character other than a control character, '"' or '\', or an escape.
_BOUNDED_STRING_CHAR = r'_characters ::= (([^\"\\\r\n]))'
_JSON_STRING_CHAR = r'_characters ::= (([^\0-\x1f\"\\]) | ("\\" basic_escape))'


class Grammars:
    """Compiles StructuredOutputs for one tokenizer and vocabulary (the model's logits may be wider
    than the tokenizer: the extra ids are never allowed). xgrammar's compiler caches what it
    compiled, so the engine compiling a spec the router already compiled costs a lookup."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import xgrammar
        except ImportError:
            raise InvalidRequest("structured outputs need xgrammar, which this server lacks (pip install "
                                 "'aptray[serve]' or xgrammar)", PARAM) from None

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(info)

    def compile(self, so: StructuredOutput):
        """so's compiled grammar; InvalidRequest (naming xgrammar's reason) if it does not compile."""
        c = self._compiler
        try:
            if so.kind == "json":
                grammar = str(self._xgr.Grammar.from_json_schema(so.spec, any_whitespace=False))
                return c.compile_grammar(grammar.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))
            if so.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if so.kind == "regex":
                return c.compile_regex(so.spec)
            if so.kind == "choice":  # JSON's string escapes are EBNF's
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False) for s in so.spec))
            return c.compile_grammar(so.spec)
        except (RuntimeError, ValueError) as e:
            reason = _LOG_PREFIX.sub("", str(e).strip())
            raise InvalidRequest(f"the {so.kind} structured output does not compile: {reason}", PARAM) from None

    def guide(self, so: StructuredOutput) -> Guide:
        return Guide(self._xgr, self.compile(so), self.vocab_size)


class Guide:
    """One request's place in its grammar."""

    def __init__(self, xgrammar, compiled, vocab_size: int):
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._mask = xgrammar.allocate_token_bitmask(1, vocab_size)  # int32 words, bit t % 32 of word t // 32

    def allowed_tokens(self) -> bytes:
        """The tokens the grammar allows next, as SeqPlan.allowed_tokens (little-endian int32 words)."""
        self._matcher.fill_next_token_bitmask(self._mask)
        return self._mask.numpy().astype("<i4", copy=False).tobytes()

    def accept(self, token: int) -> bool:
        """Advance past token; False (and no move) if the grammar does not allow it."""
        return self._matcher.accept_token(token)
