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
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from aptray import fatal_signals
from aptray.sampling_params import InvalidRequest, check_text

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 65_536  # a schema, regex or grammar's text, or all the choices together
MAX_CHOICES = 1024
# xgrammar's compile time grows faster than a schema's depth and its objects' optional properties
# (python -m loadgen.bench_grammar, 2026-12-07, the demo model's vocabulary: 0.11 s at 200 levels,
# 6.2 s at 800; 0.05 s for 256 optional properties, 1.0 s for 1000); real schemas stay far below
# both bounds
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_PROPERTIES = 256  # in one object
PARAM = "structured_outputs"
# the engine thread's time on one request's grammar for one token beyond which the request ends
# with an error: a usual grammar takes 5-9 us a token (SmolLM2's 49,152 tokens, loadgen.bench_grammar)
MAX_GUIDE_SECONDS_PER_TOKEN = 0.02
# the engine thread's CPU time for a resumed request to replay its output through its grammar (all its
# tokens at once, where it paid them a step at a time): a usual grammar's 8,192 tokens take under 0.1 s
MAX_GUIDE_REPLAY_SECONDS = 1.0
PRECISE_CLOCK_AFTER_S = 0.001  # a request's grammar time past this on the wall clock: CPU time from then on


@dataclass(frozen=True)
class StructuredOutput:
    """kind "json": spec is a JSON schema as JSON text; "json_object": any JSON object (spec "");
    "regex": a regular expression the whole output matches; "choice": spec is the strings, the output
    is one of them; "grammar": an EBNF grammar (xgrammar's GBNF dialect, starting at rule `root`)."""
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
            except ValueError:
                raise InvalidRequest("the JSON schema is not valid JSON", PARAM) from None
            except RecursionError:
                raise InvalidRequest("the JSON schema is nested too deep", PARAM) from None
            if not isinstance(schema, dict):
                raise InvalidRequest("a JSON schema is a JSON object", PARAM)
            _check_shape(schema)

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


def _check_shape(schema: dict) -> None:
    """A schema within MAX_SCHEMA_DEPTH levels of objects and arrays and MAX_SCHEMA_PROPERTIES
    properties per object."""
    todo = [(schema, 1)]
    while todo:
        value, depth = todo.pop()
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(f"the JSON schema nests objects and arrays over {MAX_SCHEMA_DEPTH} deep", PARAM)
        if isinstance(value, dict):
            properties = value.get("properties")
            if isinstance(properties, dict) and len(properties) > MAX_SCHEMA_PROPERTIES:
                raise InvalidRequest(f"an object of the JSON schema has {len(properties)} properties, over the limit "
                                     f"of {MAX_SCHEMA_PROPERTIES}", PARAM)
            value = value.values()
        todo.extend((v, depth + 1) for v in value)


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


# xgrammar 0.2.9 writes each character of a string with minLength or maxLength as [^"\\\r\n], which
# lets raw control characters in: invalid JSON (xgrammar issue #800). They are taken out of the class.
# Such a string still has no escapes (no '"', '\' or newline in it): a class keeps xgrammar's fast
# bounded repeat, where a class-or-escape rule compiled 200x slower (4.0 s against 0.02 s for 600
# bounded alternatives: python -m loadgen.bench_grammar, 2026-12-07).
_BOUNDED_STRING_CHAR = r'_characters ::= (([^\"\\\r\n]))'
_JSON_STRING_CHAR = r'_characters ::= (([^\0-\x1f\"\\]))'


class Grammars:
    """Compiles StructuredOutputs for one tokenizer and vocabulary (the model's logits may be wider
    than the tokenizer: the extra ids are never allowed), keeping the most recent compiled ones
    (at most cache_size of them and cache_bytes together): requests often share a schema. Safe from
    several threads (a router compiles at admission, and as it starts for the requests it resumes
    from Redis; a compile sandbox's child compiles too); xgrammar loads at the first compile. Each compile runs on one
    thread (xgrammar's max_threads=1): a router's two grammar threads use at most two cores."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 128, cache_bytes: int = 256 << 20,
                 tokenizer_info: str | None = None):
        """tokenizer_info: xgrammar's TokenizerInfo as tokenizer_info_json() gave it, in place of the
        tokenizer (a compile sandbox's child: grammar_sandbox.py)."""
        self.tokenizer, self.vocab_size, self._info_json = tokenizer, vocab_size, tokenizer_info
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._xgr = self._compiler = self._info = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._bytes = 0

    def compile(self, so: StructuredOutput):
        """so's compiled grammar; InvalidRequest (naming xgrammar's reason) if it does not compile."""
        compiled = self.kept(so)
        if compiled is not None:
            return compiled
        compiled = self.compile_uncached(so)
        with self._lock:
            if so not in self._compiled:
                self._compiled[so] = compiled
                self._bytes += compiled.memory_size_bytes
            while len(self._compiled) > self.cache_size or (self._bytes > self.cache_bytes and len(self._compiled) > 1):
                self._bytes -= self._compiled.popitem(last=False)[1].memory_size_bytes
        return compiled

    def kept(self, so: StructuredOutput):
        """so's compiled grammar where it is kept (now the most recent), else None: never compiles."""
        with self._lock:
            compiled = self._compiled.get(so)
            if compiled is not None:
                self._compiled.move_to_end(so)
            return compiled

    def tokenizer_info_json(self) -> str:
        """The tokenizer as xgrammar sees it (its vocabulary and stop tokens), for Grammars(tokenizer_info=);
        made once (each new sandbox child gets it)."""
        if self._info_json is None:
            self._compiler or self._load()
            self._info_json = self._info.serialize_json()
        return self._info_json

    @property
    def kept_bytes(self) -> int:
        """Memory of the compiled grammars kept."""
        return self._bytes

    def guide(self, so: StructuredOutput, compiled=None) -> Guide:
        """A Guide at the start of so's grammar (compiled: so's, where the caller compiled it already)."""
        compiled = compiled if compiled is not None else self.compile(so)
        return Guide(self._xgr, compiled, self.vocab_size)

    def compile_uncached(self, so: StructuredOutput):
        """so's compiled grammar, compiled now and not kept."""
        c = self._compiler or self._load()
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

    def _load(self):
        with self._lock:
            if self._compiler is None:
                xgrammar = self._import_xgrammar()
                if self._info_json is not None:
                    info = xgrammar.TokenizerInfo.deserialize_json(self._info_json)
                else:
                    # the engine's EOS is the only stop token: xgrammar would also take ones it finds
                    # itself (a chat model's end-of-turn), which the engine's stop rules would not end on
                    eos = getattr(self.tokenizer, "eos_token_id", None)
                    info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                                   stop_token_ids=None if eos is None else [eos])
                # no cache of xgrammar's own (unbounded by default): this class keeps what it compiled
                self._xgr, self._info = xgrammar, info
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def _import_xgrammar(self):
        if self.tokenizer is None and self._info_json is None:
            raise InvalidRequest("a structured output needs the model's tokenizer (skip_tokenizer_init is set)", PARAM)
        try:
            with fatal_signals.kept():  # not xgrammar's runtime's SIGSEGV handler, which can hang
                import xgrammar
        except ImportError:
            raise InvalidRequest("structured outputs need xgrammar, which this server lacks (pip install "
                                 "'aptray[serve]' or xgrammar)", PARAM) from None
        return xgrammar


class Guide:
    """One request's place in its grammar. last_token_seconds: the engine thread's time on it for the
    newest token taken (its bitmask and its accept). An ambiguous grammar compiles in milliseconds and
    then costs more with every token (xgrammar's matcher keeps every parse it still allows): the
    engine ends a request past MAX_GUIDE_SECONDS_PER_TOKEN rather than slow every step.

    The time is the wall clock (a 50 ns read) until one token takes over PRECISE_CLOCK_AFTER_S; from
    then on it is the thread's CPU time (a 700 ns system call; python -m timeit, 2026-12-07), and that
    token is not judged: a grammar whose cost leaps past the limit in one token is ended a token later
    (and a Guide made anew on a resume starts on the wall clock again). A thread kept waiting by the
    machine's load or by another thread's turn at the GIL is thus never charged for the wait, and a
    usual grammar's token (5-9 us) pays no system call."""

    def __init__(self, xgrammar, compiled, vocab_size: int):
        self.compiled = compiled  # a resumed request starts its new Guide from it: no compile
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._mask = xgrammar.allocate_token_bitmask(1, vocab_size)  # int32 words, bit t % 32 of word t // 32
        self._on_cpu_clock = False
        self._pending = 0.0  # the bitmasks' time since the last accept
        self.last_token_seconds = 0.0

    @property
    def _clock(self):
        return time.thread_time if self._on_cpu_clock else time.perf_counter

    def allowed_tokens(self) -> bytes:
        """The tokens the grammar allows next, as SeqPlan.allowed_tokens (little-endian int32 words)."""
        clock = self._clock
        start = clock()
        self._matcher.fill_next_token_bitmask(self._mask)
        self._pending += clock() - start
        return self._mask.numpy().astype("<i4", copy=False).tobytes()

    def accept(self, token: int) -> bool:
        """Advance past token; False (and no move) if the grammar does not allow it."""
        clock = self._clock
        start = clock()
        accepted = self._matcher.accept_token(token)
        spent, self._pending = self._pending + clock() - start, 0.0
        if not self._on_cpu_clock and spent > PRECISE_CLOCK_AFTER_S:
            self._on_cpu_clock, spent = True, 0.0  # this token's time may be a wait
        self.last_token_seconds = spent
        return accepted
