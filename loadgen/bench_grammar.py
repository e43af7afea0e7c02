"""What structured outputs cost outside a generation: xgrammar's compile time for the schema shapes
aptray bounds (and for ones within the bounds), whether a compile holds the GIL, the per-token cost
of an ambiguous grammar, the sampler's masking of ruled-out tokens against masked_fill with -inf,
the bounded-string mend against one that also allows escapes, a short regex whose compile time
explodes, and what the router's compile sandbox adds.

  python -m loadgen.bench_grammar [--out docs/results]

Compile figures use the demo model's tokenizer; the masking figures SmolLM2's 49,152-token
vocabulary. Prints a table and writes grammar_costs.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
import torch


def _spec(kind: str, spec: str):
    """A StructuredOutput without its checks: the shapes past aptray's bounds are what is measured."""
    from aptray.structured_output import StructuredOutput
    so = object.__new__(StructuredOutput)
    object.__setattr__(so, "kind", kind)
    object.__setattr__(so, "spec", spec)
    return so


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_times(grammars) -> dict:
    deep = lambda n: '{"type":"object","properties":{"a":' * n + '{"type":"integer"}' + "}}" * n  # noqa: E731
    optional = lambda n: json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"}  # noqa: E731
                                                                      for i in range(n)}})
    patterns = lambda n: json.dumps({"type": "array", "items": {"anyOf": [  # noqa: E731
        {"type": "string", "pattern": f"[a-z]{{1,{i * 10}}}"} for i in range(1, n + 1)]}})
    shapes = {"200 levels (100 properties deep)": deep(100), "800 levels (400 properties deep)": deep(400),
              "256 optional properties": optional(256), "1000 optional properties": optional(1000),
              "119 bounded string patterns": patterns(119)}
    grammars.compile(_spec("regex", "a"))  # loads xgrammar
    return {name: round(_timed(lambda s=spec: grammars.compile_uncached(_spec("json", s))), 3)
            for name, spec in shapes.items()}


def gil_gap(grammars) -> dict:
    """The event loop's view of a compile on another thread: the longest gap between 1 ms sleeps."""
    spec = _spec("json", '{"type":"object","properties":{"a":' * 300 + '{"type":"integer"}' + "}}" * 300)
    done = []
    worker = threading.Thread(target=lambda: done.append(_timed(lambda: grammars.compile_uncached(spec))))
    worker.start()
    longest, last = 0.0, time.perf_counter()
    while not done:
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    return {"compile_s": round(done[0], 3), "longest_gap_ms": round(longest * 1e3, 2)}


def ambiguous_token_ms(grammars, tokenizer) -> dict:
    """Grammar work per token (bitmask and accept) of `s ::= s s | "a"` as the output grows."""
    guide = grammars.guide(_spec("grammar", 'root ::= s\ns ::= s s | "a"'))
    a = tokenizer.encode("a", add_special_tokens=False)[0]
    out = {}
    for i in range(1, 401):
        guide.allowed_tokens()
        guide.accept(a)
        if i % 100 == 0:
            out[str(i)] = round(guide.last_token_seconds * 1e3, 2)
    return out


def usual_token_us() -> dict:
    """Grammar work per token (bitmask and accept) of a regex and a JSON schema with SmolLM2's
    tokenizer, median over a 40-token reply."""
    from transformers import AutoTokenizer

    from aptray.smollm2 import prepare_smollm2
    from aptray.structured_output import Grammars, StructuredOutput
    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    grammars = Grammars(tokenizer, 49_152)
    cases = {"regex": (StructuredOutput("regex", "[a-z ,.]{4000}"), "hello world, this is a note about numbers"),
             "json schema": (StructuredOutput("json", json.dumps({
                 "type": "object", "required": ["note"], "properties": {"note": {"type": "string"}}})),
                 '{"note": "hello world, this is a note about numbers"}')}
    out = {}
    for name, (so, reply) in cases.items():
        guide, costs = grammars.guide(so), []
        for token in tokenizer.encode(reply, add_special_tokens=False):
            guide.allowed_tokens()
            assert guide.accept(token), name
            costs.append(guide.last_token_seconds)
        out[name] = round(sorted(costs)[len(costs) // 2] * 1e6, 1)
    return out


def bounded_string_mend(grammars) -> dict:
    """600 bounded alternatives compiled with aptray's mend, and with one that also allows escapes."""
    import xgrammar

    from aptray.structured_output import _BOUNDED_STRING_CHAR, _JSON_STRING_CHAR
    schema = json.dumps({"type": "array", "items": {"anyOf": [{"type": "string", "maxLength": i}
                                                              for i in range(1, 600)]}})
    text = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False))
    escapes = _JSON_STRING_CHAR.replace("]))", '])) | ("\\\\" basic_escape)')
    compiler = grammars._compiler
    return {"class_only_s": round(_timed(lambda: compiler.compile_grammar(
                text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))), 3),
            "class_or_escape_s": round(_timed(lambda: compiler.compile_grammar(
                text.replace(_BOUNDED_STRING_CHAR, escapes))), 3)}


def slow_regex(n: int) -> str:
    """A short regex whose compile grows fast with n: n bounded character classes in alternation."""
    return "|".join(f"[a-z]{{1,{i * 37}}}x" for i in range(1, n + 1))


def slow_regex_s(grammars) -> dict:
    """Compile time of slow_regex(n) in this process."""
    compile_s = lambda n: _timed(lambda: grammars.compile_uncached(_spec("regex", slow_regex(n))))  # noqa: E731
    return {f"{n} alternatives ({len(slow_regex(n))} characters)": round(compile_s(n), 3) for n in (50, 100, 200)}


def sandbox_costs(grammars) -> dict:
    """What the router's compile sandbox (aptray.serve.grammar_sandbox) adds: its child's start-up and
    memory, a new usual schema compiled through it against in this process alone, and the time to
    refuse a regex that would compile for minutes at a 1 s deadline."""
    import asyncio

    from aptray.serve.grammar_sandbox import SandboxedCompiler
    from aptray.structured_output import StructuredOutput
    sandboxed = SandboxedCompiler(grammars, timeout_s=1.0, threads=1)

    def timed_compile(so) -> float:
        start = time.perf_counter()
        try:
            asyncio.run(sandboxed.compile(so))
        except Exception:  # the slow regex's refusal is what is timed
            pass
        return time.perf_counter() - start

    schema = lambda i: json.dumps({"type": "object", "required": ["a"], "properties": {  # noqa: E731
        "a": {"type": "string", "maxLength": 20 + i}, "b": {"type": "array", "items": {"type": "integer"}}}})
    try:
        first = timed_compile(StructuredOutput("regex", "[0-9]+"))
        with open(f"/proc/{sandboxed.child_pids[0]}/status") as f:
            rss_mb = int(f.read().split("VmRSS:")[1].split()[0]) / 1024
        through = sorted(timed_compile(StructuredOutput("json", schema(i))) for i in range(5))[2]
        alone = sorted(_timed(lambda i=i: grammars.compile_uncached(_spec("json", schema(i + 5))))
                       for i in range(5))[2]
        refused = timed_compile(StructuredOutput("regex", slow_regex(1500)))
    finally:
        sandboxed.close()
    return {"first_compile_with_child_start_s": round(first, 2), "child_rss_mb": round(rss_mb),
            "usual_schema_sandboxed_ms": round(through * 1e3, 1), "usual_schema_in_process_ms": round(alone * 1e3, 1),
            "slow_regex_1500_refused_at_1s_deadline_s": round(refused, 2)}


def masking_ms(repeats: int = 20) -> dict:
    """constrained() over 32 rows of 49,152 logits against masked_fill with -inf of the same mask."""
    from aptray.model.sampler import constrained
    from aptray.plan import SeqPlan
    rows, vocab = 32, 49_152
    logits = torch.randn(rows, vocab)
    mask = np.random.default_rng(0).integers(0, 2**32, size=vocab // 32, dtype=np.uint64).astype("<u4").tobytes()
    seqs = [SeqPlan(str(i), (1,), 5, "kv", (), True, allowed_tokens=mask) for i in range(rows)]
    banned = torch.from_numpy(np.unpackbits(np.frombuffer(mask, np.uint8), bitorder="little")[:vocab] == 0)
    banned = banned.expand(rows, vocab)

    def median(fn):
        fn()
        return sorted(_timed(fn) for _ in range(repeats))[repeats // 2] * 1e3
    return {"constrained_ms": round(median(lambda: constrained(logits, seqs)), 2),
            "masked_fill_ms": round(median(lambda: logits.masked_fill(banned, float("-inf"))), 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("APTRAY_THREADS", "2")))
    from transformers import AutoTokenizer

    from aptray.model.demo import resolve_model_path
    from aptray.structured_output import Grammars
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-opt-v1"))
    grammars = Grammars(tokenizer, 512)
    result = {"compile_s": compile_times(grammars), "gil": gil_gap(grammars),
              "ambiguous_grammar_ms_per_token": ambiguous_token_ms(grammars, tokenizer),
              "usual_grammar_us_per_token_smollm2": usual_token_us(),
              "bounded_string_mend": bounded_string_mend(grammars), "slow_regex_compile_s": slow_regex_s(grammars),
              "sandbox": sandbox_costs(grammars), "masking": masking_ms(),
              "threads": torch.get_num_threads()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grammar_costs.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
