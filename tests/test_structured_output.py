"""Structured outputs (SamplingParams.structured_output) against transformers: greedy outputs equal
transformers' generate under xgrammar's own transformers logits processor, for every kind and cache
mode; sampled outputs follow their schema, regex, choices or grammar; a structured request changes
no other request's tokens and its log-probabilities stay the model's own; a resumed request goes on
where it was; what cannot be compiled or combined is refused with the reason."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar
import xgrammar.contrib.hf
from transformers import AutoTokenizer

from aptray import LLM, SamplingParams
from aptray.config import EngineConfig
from aptray.engine import Engine
from aptray.executor.local import LocalExecutor
from aptray.model.sampler import RULED_OUT, constrained
from aptray.plan import SeqPlan
from aptray.sampling_params import InvalidRequest
from aptray.structured_output import MAX_CHOICES, MAX_SPEC_CHARS, StructuredOutput
from tiny_models import hf_model, prompts, tiny_model

torch.set_num_threads(1)

PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99}}}
REGEX = r"[a-c]{2,4}-\d{2}"
CHOICES = ("yes", "no", "maybe not")
GRAMMAR = 'root ::= "x=" [0-9] [0-9]? ";"'
KINDS = {"json": StructuredOutput("json", json.dumps(PERSON)), "json_object": StructuredOutput("json_object"),
         "regex": StructuredOutput("regex", REGEX), "choice": StructuredOutput("choice", CHOICES),
         "grammar": StructuredOutput("grammar", GRAMMAR)}


def _hf_structured_greedy(path: str, prompt: list[int], so: StructuredOutput, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate held to so by xgrammar's transformers LogitsProcessor, compiled
    here from the spec (not through aptray)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = hf_model(path)
    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=model.config.vocab_size))
    compiled = {"json": lambda: compiler.compile_json_schema(so.spec, any_whitespace=False),
                "json_object": lambda: compiler.compile_json_schema('{"type": "object"}', any_whitespace=False),
                "regex": lambda: compiler.compile_regex(so.spec),
                "choice": lambda: compiler.compile_grammar(" | ".join(['root ::= "yes"', '"no"', '"maybe not"'])),
                "grammar": lambda: compiler.compile_grammar(so.spec)}[so.kind]()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=[xgrammar.contrib.hf.LogitsProcessor(compiled)],
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model,cache_mode", [("opt-60x3", "kv"), ("opt-60x3", "hidden"), ("opt-60x3", "auto"),
                                              ("llama-48x3", "kv")])
def test_greedy_structured_outputs_are_transformers(model, cache_mode):
    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8, cache_mode=cache_mode)
    batch = prompts(len(KINDS), seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_output=so) for so in KINDS.values()]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    finished = 0
    for prompt, so, out in zip(batch, KINDS.values(), outs):
        completion = out.outputs[0]
        assert completion.token_ids == _hf_structured_greedy(path, prompt, so, 40), so.kind
        finished += completion.finish_reason == "stop"
    assert finished >= 3  # the regex, choice and grammar ones end within 40 tokens


def _follows(so: StructuredOutput, text: str) -> bool:
    if so.kind in ("json", "json_object"):
        value = json.loads(text)
        if so.kind == "json":
            jsonschema.validate(value, json.loads(so.spec))
        return isinstance(value, dict)
    if so.kind == "regex":
        return re.fullmatch(so.spec, text) is not None
    if so.kind == "choice":
        return text in so.spec
    return re.fullmatch(r"x=\d\d?;", text) is not None


def test_sampled_outputs_follow_their_structure():
    """Seeded samples at temperature 1.5 (far from the model's greedy path): each one that ends
    ("stop") is what its kind asks, and the bounded kinds all end."""
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=16)
    kinds = [so for so in KINDS.values() if so.kind != "json_object"]  # an open object may run to max_tokens
    params = [SamplingParams(temperature=1.5, seed=seed, max_tokens=64, structured_output=so)
              for so in kinds for seed in range(4)]
    outs = llm.generate(["The answer:"] * len(params), params)
    for sp, out in zip(params, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (sp.structured_output.kind, completion.text)
        assert _follows(sp.structured_output, completion.text), (sp.structured_output.kind, completion.text)
        assert completion.token_ids[-1] == llm.get_tokenizer().eos_token_id  # EOS, the one token a done grammar allows


def test_structured_requests_change_no_other_request():
    """Plain requests (greedy and seeded) batched with structured ones get the tokens they get alone."""
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=16)
    batch = [{"prompt_token_ids": p} for p in prompts(4, seed=11)]
    plain = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)] * 2
    alone = [o.outputs[0].token_ids for o in llm.generate(batch, plain)]
    structured = [SamplingParams(temperature=t, seed=1, max_tokens=12, structured_output=so)
                  for so in KINDS.values() for t in (0.0, 1.0)]
    mixed = llm.generate(batch + batch[:1] * len(structured), plain + structured)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone


def test_logprobs_stay_the_models_own():
    """A structured request's log-probabilities are the raw model's (transformers' log-softmax), not the
    grammar's: the top tokens may be ones the grammar ruled out."""
    path = tiny_model("opt-60x3")
    llm = LLM(path, max_num_seqs=4)
    prompt = prompts(1, seed=2)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=10, logprobs=5, structured_output=KINDS["regex"])
    completion = llm.generate([{"prompt_token_ids": prompt}], sp)[0].outputs[0]
    with torch.inference_mode():
        logits = hf_model(path)(torch.tensor([prompt + completion.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    for i, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert lp.logprob == pytest.approx(float(ref[i, token]), abs=2e-4)
        for t, value in lp.top:
            assert value == pytest.approx(float(ref[i, t]), abs=2e-4)
    assert any(lp.top[0][0] != token for token, lp in zip(completion.token_ids, completion.logprobs))


def test_constrained_masks_rows_and_keeps_the_raw_logits():
    logits = torch.randn(3, 70)
    raw = logits.clone()
    words = np.zeros(3, dtype="<u4")  # 96 bits for 70 tokens
    for t in (0, 31, 32, 69):
        words[t // 32] |= np.uint32(1 << (t % 32))
    mask = words.tobytes()
    seqs = [SeqPlan("a", (1,), 0, "kv", (), True, allowed_tokens=mask), SeqPlan("b", (1,), 0, "kv", (), True),
            SeqPlan("c", (1,), 0, "kv", (), True, allowed_tokens=mask)]
    out = constrained(logits, seqs)
    assert torch.equal(logits, raw)  # a new tensor: log-probabilities read the raw one
    for row in (0, 2):
        allowed = (out[row] > RULED_OUT / 2).nonzero().flatten().tolist()
        assert allowed == [0, 31, 32, 69]
        assert torch.equal(out[row, allowed], raw[row, allowed])
        assert torch.softmax(out[row] / 1e-5, -1)[allowed].sum() == 1.0  # exactly: no probability elsewhere
        assert torch.softmax(out[row] + 100 * (out[row] < 0), -1)[allowed].sum() == 1.0  # nor with a bias
    assert torch.equal(out[1], raw[1])
    every = constrained(logits[[0, 2]], [seqs[0], seqs[2]])  # every row held: the same rows
    assert torch.equal(every[0], out[0]) and torch.equal(every[1], out[2])
    with pytest.raises(ValueError, match="mask of 32 bits for a vocabulary of 70"):
        constrained(logits, [SeqPlan("a", (1,), 0, "kv", (), True, allowed_tokens=words[:1].tobytes())])


def test_resumed_request_goes_on_in_its_grammar():
    """A request resumed with the tokens it had (a fault) ends as one never interrupted; outputs the
    grammar cannot have produced (a tampered record) are refused."""
    path = tiny_model("opt-60x3")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = EngineConfig(model=path, max_num_seqs=4)
    prompt = prompts(1, seed=6)[0]
    sp = SamplingParams(temperature=0.9, seed=5, max_tokens=40, structured_output=KINDS["json"])

    def run(engine, rid):
        while True:
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    return out.outputs[0].token_ids

    engine = Engine(config, LocalExecutor(config), tokenizer)
    engine.add_request("whole", prompt, sp)
    whole = run(engine, "whole")
    assert len(whole) > 8
    engine.resume_request("resumed", prompt, sp, whole[:7], [0.0] * 7, 0.0)
    assert run(engine, "resumed") == whole
    with pytest.raises(InvalidRequest, match="break the request's structured output"):
        engine.resume_request("tampered", prompt, sp, [tokenizer.eos_token_id], [0.0], 0.0)
    assert "tampered" not in engine.scheduler.requests
    # a shard rebuild's snapshot carries the compiled grammar: the resume compiles nothing, even
    # once the router no longer keeps that grammar
    from aptray.serve.resume import from_request
    engine.grammars.cache_size = 1
    engine.add_request("interrupted", prompt, sp)
    while len(engine.scheduler.requests["interrupted"].output_token_ids) < 7:
        engine.step()
    snapshot = from_request(engine.scheduler.requests["interrupted"])
    engine.abort("interrupted")
    engine.grammars.compile(KINDS["regex"])  # evicts the JSON schema's grammar
    assert not engine.grammars.kept(sp.structured_output) and snapshot.grammar is not None
    engine.resume_request("rebuilt", prompt, sp, snapshot.output_token_ids, snapshot.token_times, 0.0,
                          grammar=snapshot.grammar)
    assert run(engine, "rebuilt") == whole and not engine.grammars.kept(sp.structured_output)


@pytest.mark.parametrize("so,match", [
    (dict(kind="xml", spec="<a/>"), "kind is one of"),
    (dict(kind="json", spec="{"), "not valid JSON"),
    (dict(kind="json", spec="[1]"), "a JSON schema is a JSON object"),
    (dict(kind="json", spec="9" * 10**5), "not valid JSON|over the limit"),
    (dict(kind="json", spec="[" * 10**4), "nested too deep"),
    (dict(kind="json", spec='{"items": ' * 64 + "{}" + "}" * 64), "over 64 deep"),
    (dict(kind="json", spec=json.dumps({"properties": {f"p{i}": {} for i in range(257)}})), "257 properties"),
    (dict(kind="json_object", spec="{}"), "takes no schema"),
    (dict(kind="regex", spec=""), "is empty"),
    (dict(kind="regex", spec=5), "takes a string"),
    (dict(kind="regex", spec="a" * (MAX_SPEC_CHARS + 1)), "over the limit"),
    (dict(kind="regex", spec="\ud800"), "lone surrogate"),
    (dict(kind="choice", spec=()), "1 to 1024 strings"),
    (dict(kind="choice", spec=("a",) * (MAX_CHOICES + 1)), "1 to 1024 strings"),
    (dict(kind="choice", spec=("a", "")), "non-empty string"),
    (dict(kind="choice", spec="yes"), "1 to 1024 strings"),
    (dict(kind="choice", spec=("a", 1)), "non-empty string"),
])
def test_malformed_structured_outputs_are_refused(so, match):
    with pytest.raises(InvalidRequest, match=match) as refused:
        SamplingParams(structured_output=so)
    assert refused.value.param == "structured_outputs"


def test_structured_output_survives_a_dict_round_trip():
    """A Redis record holds SamplingParams as a dict (dataclasses.asdict): it reads back the same."""
    from dataclasses import asdict
    for so in KINDS.values():
        sp = SamplingParams(structured_output=so)
        assert SamplingParams(**json.loads(json.dumps(asdict(sp)))) == sp


@pytest.mark.parametrize("sp,match", [
    (dict(structured_output=StructuredOutput("json", '{"type": "nope"}')), "does not compile: Unsupported type"),
    (dict(structured_output=StructuredOutput("json", '{"type": "integer", "minimum": -1e300}')), "does not compile"),
    (dict(structured_output=StructuredOutput("regex", "(a")), "does not compile: Regex parsing error"),
    (dict(structured_output=StructuredOutput("grammar", "root ::= ")), "does not compile: EBNF parser error"),
    (dict(structured_output=StructuredOutput("grammar", 'start ::= "a"')), "does not compile"),
    (dict(structured_output=KINDS["regex"], min_tokens=2), "min_tokens cannot be combined"),
    (dict(structured_output=KINDS["regex"], ignore_eos=True), "ignore_eos cannot be combined"),
])
def test_what_cannot_be_served_is_refused_and_the_engine_goes_on(sp, match):
    llm = _shared_llm()
    with pytest.raises(ValueError, match=match):
        llm.generate(["hi"], SamplingParams(max_tokens=4, **sp))
    out = llm.generate(["hi"], SamplingParams(temperature=0.0, max_tokens=16, structured_output=KINDS["choice"]))
    assert out[0].outputs[0].text in CHOICES


_LLM = []


def _shared_llm() -> LLM:
    if not _LLM:
        _LLM.append(LLM(tiny_model("opt-60x3"), max_num_seqs=4))
    return _LLM[0]


def test_skip_tokenizer_init_refuses_structured_outputs():
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=2, skip_tokenizer_init=True)
    with pytest.raises(InvalidRequest, match="needs the model's tokenizer"):
        llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(structured_output=KINDS["regex"]))


def test_bounded_json_strings_are_json():
    """A string with maxLength holds no raw control character (the schema's grammar is mended where
    xgrammar 0.2.9 lets them in), and its length still counts. It holds no escape either (xgrammar
    issue #800, left as it is: the mend that allowed them compiled 100x slower)."""
    from aptray.structured_output import Grammars
    path = tiny_model("opt-60x3")
    compiled = Grammars(AutoTokenizer.from_pretrained(path), 512).compile(
        StructuredOutput("json", '{"type": "string", "maxLength": 3}'))

    def accepts(text: str) -> bool:
        matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return matcher.accept_string(text) and matcher.is_completed()

    assert accepts('"abc"') and accepts('"é!"') and accepts('""')
    assert not accepts('"a\x12"') and not accepts('"a\tb"') and not accepts('"abcd"') and not accepts('"\\q"')
    assert not accepts('"a\\nb"') and not accepts('"\\u00e9"')  # no escapes: issue #800


@pytest.mark.parametrize("scheduler,cache_mode", [("apt", "auto"), ("sarathi", "kv"), ("vllm", "kv")])
def test_every_policy_holds_the_structure(scheduler, cache_mode):
    """Each scheduling policy builds its rows through the same plan helpers: the same tokens as fcfs."""
    path = tiny_model("opt-60x3")
    batch = [{"prompt_token_ids": p} for p in prompts(4, seed=8)]
    params = [SamplingParams(temperature=t, seed=2, max_tokens=30, structured_output=so)
              for so in (KINDS["choice"], KINDS["regex"]) for t in (0.0, 1.0)]
    want = [o.outputs[0].token_ids for o in LLM(path, max_num_seqs=8).generate(batch, params)]
    got = LLM(path, max_num_seqs=8, scheduler=scheduler, cache_mode=cache_mode).generate(batch, params)
    assert [o.outputs[0].token_ids for o in got] == want


def test_an_ambiguous_grammar_ends_its_request_not_the_others(monkeypatch):
    """`s ::= s s | "a"` compiles in milliseconds, then costs xgrammar's matcher more with every token
    (30 ms a token by 400 tokens here): its request ends with an error once one token's grammar work
    passes the limit; a plain request beside it gets its tokens. The limit is lowered to 2 ms so
    that the cost passes it well before max_tokens on a machine several times faster than this one."""
    import aptray.engine
    monkeypatch.setattr(aptray.engine, "MAX_GUIDE_SECONDS_PER_TOKEN", 0.002)
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=4)
    tok = llm.get_tokenizer()
    a = tok.encode("a", add_special_tokens=False)[0]
    ambiguous = SamplingParams(temperature=0.0, max_tokens=1000, logit_bias={a: 100.0},
                               structured_output=StructuredOutput("grammar", 'root ::= s\ns ::= s s | "a"'))
    plain = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    alone = llm.generate(["hi"], plain)[0].outputs[0].token_ids
    out = llm.generate(["x", "hi"], [ambiguous, plain])
    assert out[0].outputs[0].finish_reason == "error", out[0].outputs[0].finish_reason
    assert "over the limit of 2 ms (an ambiguous grammar)" in out[0].error and out[0].error_from_request
    assert 5 < len(out[0].outputs[0].token_ids) < 1000
    assert out[1].outputs[0].token_ids == alone


def test_a_resume_that_would_stall_the_engine_in_its_grammar_is_refused(monkeypatch):
    """A resumed request replays its output through its grammar at once, on the engine thread: an
    ambiguous grammar is refused there at the first token over the per-token limit (lowered to 2 ms, as
    above), and a replay over MAX_GUIDE_REPLAY_SECONDS in all (lowered to 0) likewise; the engine keeps
    serving, and a usual grammar's resume goes on."""
    import aptray.engine
    monkeypatch.setattr(aptray.engine, "MAX_GUIDE_SECONDS_PER_TOKEN", 0.002)
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=4)
    engine, tok = llm.engine, llm.get_tokenizer()
    a = tok.encode("a", add_special_tokens=False)[0]
    ambiguous = SamplingParams(temperature=0.0, max_tokens=2000, structured_output=StructuredOutput(
        "grammar", 'root ::= s\ns ::= s s | "a"'))
    with pytest.raises(InvalidRequest, match="over the limit of 2 ms"):
        engine.resume_request("ambiguous", [5, 6], ambiguous, [a] * 1500, [0.0] * 1500, 0.0)
    assert "ambiguous" not in engine.scheduler.requests
    monkeypatch.setattr(aptray.engine, "MAX_GUIDE_REPLAY_SECONDS", 0.0)
    regex = SamplingParams(temperature=0.0, max_tokens=8, structured_output=StructuredOutput("regex", "a+"))
    with pytest.raises(InvalidRequest, match="to replay for 3 output tokens"):
        engine.resume_request("replay", [5, 6], regex, [a] * 3, [0.0] * 3, 0.0)
    monkeypatch.setattr(aptray.engine, "MAX_GUIDE_REPLAY_SECONDS", 1.0)
    engine.resume_request("usual", [5, 6], regex, [a] * 3, [0.0] * 3, 0.0)
    plain = llm.generate(["hi"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(plain.outputs[0].token_ids) == 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_structure_its_own_filters_rule_out_ends_its_request_as_its_own_doing(temperature):
    """A choice of "yes" with allowed_token_ids or bad_words that rule out every token it could begin with:
    greedy and sampled alike, the request ends with an error that says so and is marked the request's own
    (a client's 400 when served, not the server's 500); a plain request beside it gets its tokens."""
    llm = LLM(tiny_model("opt-60x3"), max_num_seqs=4)
    tok = llm.get_tokenizer()
    choice = StructuredOutput("choice", ["yes"])
    starts = {ids[0] for ids in (tok.encode(w, add_special_tokens=False) for w in ("y", "ye", "yes"))}
    other = next(t for t in range(5, 100) if t not in starts)
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = llm.generate(["hi"], plain)[0].outputs[0].token_ids
    for filters in ({"allowed_token_ids": [other]}, {"bad_words": ["y", "ye", "yes"]}):
        ruled_out = SamplingParams(temperature=temperature, seed=1, max_tokens=5, structured_output=choice, **filters)
        out = llm.generate(["x", "hi"], [ruled_out, plain])
        assert out[0].outputs[0].finish_reason == "error", (filters, out[0].outputs[0])
        assert "leave no token to choose" in out[0].error and out[0].error_from_request, out[0].error
        assert out[1].outputs[0].token_ids == alone


def test_a_grammar_thread_kept_waiting_is_not_charged_for_the_wait(monkeypatch):
    """A thread kept off the CPU inside the matcher (here a 50 ms sleep in each bitmask, past the 20 ms
    limit in wall time), as a loaded machine or another thread's turn at the GIL would keep it, still
    gets its request's tokens: past 1 ms the guide judges the thread's CPU time instead."""
    path = tiny_model("opt-60x3")
    params = SamplingParams(temperature=0.0, max_tokens=8, structured_output=KINDS["regex"])
    want = LLM(path).generate(["hi"], params)[0].outputs[0]

    class KeptWaiting(xgrammar.GrammarMatcher):
        def fill_next_token_bitmask(self, *args, **kwargs):
            filled = super().fill_next_token_bitmask(*args, **kwargs)
            time.sleep(0.05)
            return filled

    monkeypatch.setattr(xgrammar, "GrammarMatcher", KeptWaiting)
    got = LLM(path).generate(["hi"], params)[0].outputs[0]
    assert got.finish_reason == want.finish_reason != "error", got.finish_reason
    assert got.token_ids == want.token_ids and len(got.token_ids) > 1


def test_compiled_grammars_kept_are_bounded():
    from aptray.structured_output import Grammars
    grammars = Grammars(AutoTokenizer.from_pretrained(tiny_model("opt-60x3")), 512, cache_size=4)
    for i in range(10):
        grammars.compile(StructuredOutput("regex", f"[a-z]{{{i + 1}}}"))
    assert len(grammars._compiled) == 4 and grammars.kept_bytes > 0
    one = grammars.kept_bytes // 4
    small = Grammars(grammars.tokenizer, 512, cache_bytes=one * 2)
    for i in range(10):
        small.compile(StructuredOutput("regex", f"[a-z]{{{i + 1}}}"))
    assert 1 <= len(small._compiled) <= 3 and small.kept_bytes <= one * 3
