"""Sampling controls against transformers: the distribution each request samples from (temperature,
top-k, top-p, min-p, logit bias), and greedy generation with logit_bias, min_tokens and stop ids
token for token; min_tokens also holds off stop strings. Presence and frequency penalties, which
transformers lacks, against OpenAI's formula over transformers' logits."""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from aptray import LLM, SamplingParams
from aptray.model.sampler import distribution, penalized, repeated, sample
from aptray.plan import SeqPlan
from aptray.request import Request
from aptray.sampling_params import InvalidRequest
from aptray.stop import StopChecker
from aptray.structured_output import StructuredOutput
from tiny_models import hf_model, prompts, tiny_model

torch.set_num_threads(1)
VOCAB = 300


def _seq(temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, logit_bias=(), seed=None):
    return SeqPlan("r", (1,), 0, "kv", (0,), True, temperature, top_p, top_k, seed, 0, min_p, logit_bias)


def _transformers_distribution(row, temperature, top_k, top_p, min_p, bias):
    """transformers' processors in generate's order: the bias, then the warpers."""
    procs = LogitsProcessorList()
    if bias:
        procs.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in bias]))
    procs.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        procs.append(MinPLogitsWarper(min_p))
    scores = procs(torch.zeros(1, 1, dtype=torch.long), row[None].clone())
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,bias", [
    (1.0, -1, 1.0, 0.1, ()),
    (0.7, -1, 1.0, 0.3, ()),
    (1.3, 50, 0.9, 0.05, ()),
    (0.5, -1, 0.8, 0.02, ((3, 2.5), (10, -4.0))),
    (2.0, 100, 0.95, 0.0, ((7, 100.0),)),
    (1.0, 20, 1.0, 0.0, ((0, -100.0), (299, 1e-300))),
])
def test_the_sampled_distribution_is_transformers(temperature, top_k, top_p, min_p, bias):
    g = torch.Generator().manual_seed(11)
    for _ in range(5):
        row = torch.randn(VOCAB, generator=g) * 3
        seq = _seq(temperature, top_p, top_k, min_p, bias)
        biased = row.clone()
        for t, b in bias:
            biased[t] += b
        ours = distribution(biased, seq)
        ref = _transformers_distribution(row, temperature, top_k, top_p, min_p, bias)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(ours > 0, ref > 0)  # the same tokens kept


def test_the_nucleus_is_transformers_from_the_candidates_or_the_whole_vocabulary(monkeypatch):
    """top-p over 2,000 tokens with tiers of 16 and 256 candidates: peaked rows find their nucleus among
    the first 16, a flatter one among 256, the flattest (a high temperature) are sorted whole; all keep
    transformers' tokens, mixed in one batch, and each draws, from its tier's candidates or its whole
    distribution, the token that distribution's inverse CDF gives."""
    from aptray.model import sampler
    monkeypatch.setattr(sampler, "CANDIDATE_TIERS", (16, 256))
    vocab, g = 2000, torch.Generator().manual_seed(7)
    peaked = torch.randn(4, vocab, generator=g) * 6
    flat = torch.randn(4, vocab, generator=g)
    logits = torch.cat([peaked, flat])
    kinds = [(0.7, 0.9), (1.0, 0.5), (0.8, 0.95), (1.0, 1e-9), (1.0, 0.9), (2.0, 0.5), (1.5, 0.99), (1.0, 0.3)]
    seqs = [_seq(temperature=t, top_p=p) for t, p in kinds]
    def tier(row, t, p):  # the candidates that hold the row's nucleus
        return next((k for k in (16, 256) if float(torch.softmax(row / t, -1).topk(k).values.sum()) >= p), "whole")
    assert [tier(row, t, p) for row, (t, p) in zip(logits, kinds)] == [16] * 4 + ["whole"] * 3 + [256]
    ours = sampler.distributions(logits, seqs)
    for row, (t, p), got in zip(logits, kinds, ours):
        want = _transformers_distribution(row, t, -1, p, 0.0, ())
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(got > 0, want > 0)
    for seed in range(10):
        tokens, errors, _ = sample(logits, seqs, torch.Generator().manual_seed(seed))
        u = sampler._uniforms(seqs, torch.Generator().manual_seed(seed), logits.device)
        assert not errors and tokens == sampler._drawn(ours.clone(), u, logits.argmax(-1))[0].tolist(), seed


def test_a_banned_token_is_never_drawn_and_a_forced_one_always():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=g)
    top = logits.argmax(dim=-1)
    rows = [_seq(temperature=1.5, logit_bias=((int(top[i]), -math.inf),), seed=i) for i in range(32)]
    rows += [_seq(temperature=t, logit_bias=((5, 100.0),), seed=i) for i, t in zip(range(32), [0.0, 1.0] * 16)]
    tokens, errors, own = sample(logits, rows, torch.Generator().manual_seed(1))
    assert not errors and not own
    assert all(tokens[i] != int(top[i]) for i in range(32))
    assert tokens[32:] == [5] * 32


def test_each_row_of_a_batch_draws_from_its_own_distribution():
    """One batch mixing every control: each row's draws (2,000 rows of it, unseeded or of distinct seeds)
    follow the distribution it asks for, within sampling noise (total variation under 0.06 over 16
    tokens, where 2,000 draws give about 0.03); greedy rows take their argmax."""
    vocab, copies = 16, 2000
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 2
    kinds = [_seq(), _seq(temperature=0.6, top_k=5), _seq(temperature=1.4, top_p=0.7), _seq(min_p=0.15),
             _seq(top_k=8, top_p=0.9, min_p=0.05, logit_bias=((2, 3.0), (base.argmax().item(), -50.0))),
             _seq(temperature=0.8, seed=0), _seq(temperature=0.0, logit_bias=((4, 100.0),))]
    seqs = [kind._replace(seed=i) if kind.seed is not None else kind
            for kind in kinds for i in range(copies)]
    tokens, errors, own = sample(base.expand(len(seqs), vocab).clone(), seqs, torch.Generator().manual_seed(5))
    assert not errors and not own
    for k, kind in enumerate(kinds[:-1]):
        biased = base.clone()
        for t, b in kind.logit_bias:
            biased[t] += b
        want = distribution(biased, kind)
        got = torch.bincount(torch.tensor(tokens[k * copies:(k + 1) * copies]), minlength=vocab) / copies
        assert float((got - want).abs().sum()) / 2 < 0.06, (k, got, want)
        assert not got[want == 0].any()  # a filtered token is never drawn
    assert tokens[-copies:] == [4] * copies


def test_a_draw_inverts_the_cumulative_probabilities_and_never_lands_on_a_token_of_probability_0(monkeypatch):
    """Each row's token is the first whose cumulative probability passes its uniform number times the
    row's total; a number that rounds up to the total (the float's last step) takes the most likely
    token rather than the zero-probability tokens at the end of the vocabulary."""
    from aptray.model import sampler
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3, 0.0, 0.0]] * 4)
    numbers = torch.tensor([0.0, 0.2, 0.69, 1.0])
    tokens, ok = sampler._drawn(probs.clone(), numbers, torch.tensor([2] * 4))
    assert tokens.tolist() == [0, 2, 2, 2] and ok.all()


def test_a_row_drawn_from_its_candidates_draws_what_its_whole_distribution_would(monkeypatch):
    """Rows asking top-k, top-p or min-p are drawn from their most likely tokens where those hold all the
    row may draw (tiers of 16 and 256 candidates here, over 2,000 tokens), the rest from their whole
    distribution: every row draws, at the same uniform number, the token the whole distribution's
    inverse CDF gives. Each tier holds some rows and passes others on: a top-k past the last tier, a
    tie at a top-k's edge (transformers keeps every tied token), a flat row's nucleus past both."""
    from aptray.model import sampler
    monkeypatch.setattr(sampler, "CANDIDATE_TIERS", (16, 256))
    vocab, g = 2000, torch.Generator().manual_seed(9)
    kinds = [_seq(top_k=10), _seq(top_k=100), _seq(temperature=0.7, top_k=12, top_p=0.9), _seq(top_p=0.8),
             _seq(top_p=0.95, min_p=0.02), _seq(min_p=0.1), _seq(temperature=1.3, top_k=600, top_p=0.3), _seq(top_k=5),
             _seq(top_p=0.9), _seq(temperature=2.0, top_p=0.99), _seq(temperature=0.5), _seq()]
    scales = [6, 6, 6, 6, 6, 6, 1, 6, 3, 1, 3, 3]
    logits = torch.randn(len(kinds), vocab, generator=g) * torch.tensor(scales)[:, None]
    logits[7, :8] = logits[7].max() + 1  # eight tokens tie for a top-5
    held_by_tier = []
    among_top = sampler._drawn_among_top

    def recorded(*args):
        out = among_top(*args)
        *_, seqs, width = args
        held_by_tier.append((width, sorted(kinds.index(s) for s, h in zip(seqs, out[2].tolist()) if h)))
        return out
    monkeypatch.setattr(sampler, "_drawn_among_top", recorded)
    for seed in range(40):
        held_by_tier.clear()
        tokens, errors, own = sample(logits, kinds, torch.Generator().manual_seed(seed))
        u = sampler._uniforms(kinds, torch.Generator().manual_seed(seed), logits.device)
        whole, _ = sampler._drawn(sampler.distributions(logits, kinds), u, logits.argmax(-1))
        assert not errors and tokens == whole.tolist(), seed
    # the top-k of 600 (its top-p's nucleus is among 256 tokens, but its normalizer is not), the tie and
    # the flattest row are drawn from their whole distribution
    assert held_by_tier == [(16, [0, 2, 3, 4, 5]), (256, [1, 8])], held_by_tier


def test_extreme_controls_and_broken_rows_draw_as_the_whole_distribution_would(monkeypatch):
    """Random batches of extreme sampling controls (top-k past the vocabulary, top-p of the smallest
    double, min-p 1, temperatures from 1e-5 to 100) over logits with an infinite, a NaN or an all -inf
    row: a row with a logit that is not finite fails, greedy or sampled (a NaN or +inf from the model;
    every token -inf: nothing it may draw, its own error), whatever its filters would drop, and every
    other row draws the token its whole distribution's inverse CDF gives at the same number. (Logits
    without ties: which of tied tokens a top-p keeps is the sort's choice.)"""
    from aptray.model import sampler
    monkeypatch.setattr(sampler, "CANDIDATE_TIERS", (16, 256))
    rng = random.Random(4)
    for trial in range(300):
        vocab, n = rng.choice([2, 17, 300, 700]), rng.randint(1, 5)
        seqs = [_seq(temperature=rng.choice([1.0, 0.5, 2.0, 1e-5, 0.0, 100.0]),
                     top_p=rng.choice([1.0, 0.9, 0.5, 5e-324, 0.999999]),
                     top_k=rng.choice([-1, 0, 1, 5, 16, 17, 255, 256, 257, vocab - 1, vocab, 10**9]),
                     min_p=rng.choice([0.0, 0.0, 0.05, 1.0, 1e-30]), seed=rng.choice([None, 7, -2**40]))
                for _ in range(n)]
        logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial)) * rng.choice([0.1, 1, 10])
        broken = rng.choice(["inf", "nan", "-inf", None, None])
        if broken is not None:
            logits[0, rng.randrange(vocab)] = float(broken) if broken != "-inf" else 0.0
            if broken == "-inf":
                logits[0] = float("-inf")
        tokens, errors, own = sample(logits, seqs, torch.Generator().manual_seed(trial))
        drawn = [i for i, s in enumerate(seqs) if s.temperature >= 1e-5]
        want = logits.argmax(-1)
        ok = torch.ones(n, dtype=torch.bool)
        if drawn:
            rows = torch.tensor(drawn)
            u = sampler._uniforms([seqs[i] for i in drawn], torch.Generator().manual_seed(trial), logits.device)
            whole, whole_ok = sampler._drawn(sampler.distributions(logits[rows], [seqs[i] for i in drawn]), u,
                                             want[rows])
            want, ok = want.index_copy(0, rows, whole), ok.index_copy(0, rows, whole_ok)
        finite = torch.isfinite(logits).all(-1)
        assert set(errors) == {i for i in range(n) if not finite[i]}, (trial, errors)
        assert own == {i for i in range(n) if bool(torch.isneginf(logits[i]).all())}, trial
        assert all(ok[i] for i in drawn if finite[i]), trial
        assert [t for i, t in enumerate(tokens) if i not in errors] == \
            [t for i, t in enumerate(want.tolist()) if i not in errors], trial


def _hf_generate(path, prompt, max_new, min_new, bias, eos_ids):
    model = hf_model(path)
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens, config.min_new_tokens = False, max_new, min_new
    config.eos_token_id = list(eos_ids)
    config.sequence_bias = [[[t], b] for t, b in bias.items()] or None
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, generation_config=config, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model", ["opt-60x3", "llama-48x3"])
def test_greedy_with_bias_min_tokens_and_stop_ids_is_transformers(model):
    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8)
    eos = llm.tokenizer.eos_token_id
    batch = prompts(6, seed=5)
    asks = [  # (min_tokens, logit_bias, stop_token_ids)
        (3, {eos: 100.0}, []),  # EOS forced, held off for 3 tokens
        (0, {eos: 100.0}, []),
        (5, {41: 100.0}, [41]),  # a stop id forced, held off for 5
        (0, {17: 2.5, 40: -100.0, 3: 0.75}, []),
        (2, {}, [eos + 1]),
        (0, {}, []),
    ]
    params = [SamplingParams(temperature=0.0, max_tokens=10, min_tokens=m, logit_bias=b, stop_token_ids=s)
              for m, b, s in asks]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    for prompt, (m, b, s), out in zip(batch, asks, outs):
        ours = list(out.outputs[0].token_ids)
        assert ours == _hf_generate(path, prompt, 10, m, b, [eos, *s]), (m, b, s)
    assert [len(o.outputs[0].token_ids) for o in outs[:3]] == [4, 1, 6]
    assert [o.outputs[0].finish_reason for o in outs[:3]] == ["stop"] * 3


def test_sampled_with_min_tokens_ends_right_after_them():
    llm = LLM(tiny_model("opt-60x3"))
    eos = llm.tokenizer.eos_token_id
    sp = SamplingParams(temperature=1.0, seed=4, max_tokens=20, min_tokens=6, min_p=0.05, logit_bias={str(eos): 100})
    out = llm.generate({"prompt_token_ids": [3, 9, 27]}, sp)[0].outputs[0]
    assert eos not in out.token_ids[:6] and list(out.token_ids[6:]) == [eos] and out.finish_reason == "stop"


def test_min_tokens_holds_off_stop_strings_as_well():
    llm = LLM(tiny_model("opt-60x3"))
    tok = llm.tokenizer
    ids = tok.encode("a b a b a b", add_special_tokens=False)
    text_upto = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
    first = next(i for i, t in enumerate(text_upto) if "b" in t)  # output index completing the first "b"
    second = next(i for i, t in enumerate(text_upto) if t.count("b") == 2)
    for min_tokens, ends_at in ((0, first), (first + 1, second)):
        sp = SamplingParams(max_tokens=len(ids), min_tokens=min_tokens, stop=["b"])
        checker = StopChecker(sp, tok.eos_token_id, 1000, tok)
        status = None
        for i, t in enumerate(ids):
            status = checker.check(t, i + 1, 10 + i + 1)
            if status is not None:
                break
        assert status is not None and i == ends_at and checker.text == text_upto[ends_at][:text_upto[ends_at].rfind("b")]


def test_min_tokens_bans_eos_and_stop_ids_in_the_plan_until_reached():
    sp = SamplingParams(max_tokens=8, min_tokens=2, stop_token_ids=[9], logit_bias={"4": -1.5})
    req = Request("r", [1, 2], sp, 0.0, 1.0, 1.0, eos_token_id=2)
    assert dict(req.step_logit_bias(0)) == dict(req.step_logit_bias(1)) == {4: -1.5, 2: -math.inf, 9: -math.inf}
    assert req.step_logit_bias(2) == ((4, -1.5),)
    eos_ignored = Request("r", [1, 2], SamplingParams(max_tokens=8, min_tokens=2, ignore_eos=True), 0.0, 1.0, 1.0,
                          eos_token_id=2)
    assert eos_ignored.step_logit_bias(0) == ()


@pytest.mark.parametrize("kw,param", [
    ({"min_p": 1.5}, "min_p"), ({"min_p": math.nan}, "min_p"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"), ({"logit_bias": {5: math.inf}}, "logit_bias"),
    ({"logit_bias": {5: 100.5}}, "logit_bias"), ({"logit_bias": [5, 1]}, "logit_bias"),
    ({"logit_bias": {True: 1}}, "logit_bias"), ({"n": 0}, "n"), ({"n": 1025}, "n"), ({"n": True}, "n"),
    ({"n": 2.0}, "n"),
])
def test_bad_sampling_controls_name_their_parameter(kw, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(max_tokens=16, **kw)
    assert e.value.param == param


def test_n_sequences_of_a_prompt_are_separate_draws_seeded_seed_plus_i():
    """SamplingParams(n) offline (vLLM's): one output per prompt holding n sequences, index i, in the
    prompts' order; seeded, sequence i is the output of seed + i; greedy, each is the greedy output;
    unseeded, each its own draw. The engine alone takes one sequence per request."""
    llm = LLM(tiny_model("opt-60x3"))
    a, b = ({"prompt_token_ids": p} for p in prompts(2, seed=5))
    sp = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    out_a, out_b, out_free = llm.generate([a, b, a], [sp, greedy, SamplingParams(n=4, max_tokens=6, ignore_eos=True)])
    assert [o.index for o in out_a.outputs] == [0, 1, 2] and out_a.prompt_token_ids == a["prompt_token_ids"]
    singles = [llm.generate(a, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=6, ignore_eos=True))[0]
               for i in range(3)]
    assert [o.token_ids for o in out_a.outputs] == [s.outputs[0].token_ids for s in singles]
    assert len({tuple(o.token_ids) for o in out_a.outputs}) > 1
    one = llm.generate(b, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert [o.token_ids for o in out_b.outputs] == [one.token_ids] * 2
    assert len(out_free.outputs) == 4 and len({tuple(o.token_ids) for o in out_free.outputs}) > 1
    assert len({out_a.request_id, out_b.request_id, out_free.request_id}) == 3
    with pytest.raises(InvalidRequest) as e:
        llm.engine.add_request("x", [1, 2], SamplingParams(n=2))
    assert e.value.param == "n"


def test_prompts_come_as_vllms_three_forms():
    """Text, {"prompt": text} and {"prompt_token_ids": the text's ids} are one prompt; anything else is
    a TypeError naming the forms."""
    llm = LLM(tiny_model("opt-60x3"))
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ids = llm.get_tokenizer().encode("hello there")
    outs = llm.generate(["hello there", {"prompt": "hello there"}, {"prompt_token_ids": ids}], sp)
    assert [o.prompt for o in outs] == ["hello there", "hello there", None]
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1 and outs[1].prompt_token_ids == ids
    with pytest.raises(TypeError, match="prompt_token_ids"):
        llm.generate({"text": "hello"}, sp)


def test_logit_bias_ids_outside_the_vocabulary_are_refused():
    llm = LLM(tiny_model("opt-60x3"))
    vocab = llm.engine.config.spec.vocab_size
    with pytest.raises(InvalidRequest) as e:
        llm.generate({"prompt_token_ids": [3, 4]}, SamplingParams(logit_bias={vocab: 1.0}))
    assert e.value.param == "logit_bias"
    assert SamplingParams(logit_bias={"0042": 1, 7: -5e-324}).logit_bias == {42: 1.0, 7: -5e-324}


def _penalized_greedy(path, prompt, max_new, presence, frequency):
    """Greedy decoding over transformers' logits with OpenAI's penalties: logit[t] -= presence * (t in the
    output) + frequency * (times t is in the output)."""
    model, out = hf_model(path), []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt) + out])).logits[0, -1].float()
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("model", ["opt-60x3", "llama-48x3"])
def test_greedy_with_presence_and_frequency_penalties_is_openais_formula(model):
    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8)
    batch = prompts(5, seed=8)
    asks = [(0.0, 2.0), (1.5, 0.0), (0.5, 0.75), (-2.0, 0.0), (0.0, -0.5)]  # (presence, frequency)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=p, frequency_penalty=f)
              for p, f in asks]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    plain = llm.generate([{"prompt_token_ids": p} for p in batch], SamplingParams(temperature=0.0, max_tokens=12,
                                                                                 ignore_eos=True))
    for prompt, (p, f), out in zip(batch, asks, outs):
        assert list(out.outputs[0].token_ids) == _penalized_greedy(path, prompt, 12, p, f), (p, f)
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in plain]  # they act


def test_penalties_shape_the_sampled_distribution():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(VOCAB, generator=g)
    counts = {4: 3, 17: 1, 250: 2}
    seq = _seq(temperature=0.8, top_p=0.9)._replace(presence_penalty=0.4, frequency_penalty=-0.3,
                                                    output_counts=(tuple(counts), tuple(counts.values())))
    other = _seq()._replace(presence_penalty=2.0, output_counts=((4,), (1,)))
    want = row.clone()
    for t, n in counts.items():
        want[t] -= 0.4 + -0.3 * n
    got = penalized(torch.stack([row, row, row]), [seq, _seq(), other])
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], row)  # rows without penalties are untouched
    assert float(got[2, 4]) == pytest.approx(float(row[4]) - 2.0) and torch.equal(got[2, 5:], row[5:])
    torch.testing.assert_close(distribution(got[0], seq), _transformers_distribution(want, 0.8, -1, 0.9, 0.0, ()),
                               atol=1e-6, rtol=1e-5)


def test_output_counts_follow_the_outputs_and_a_resume():
    req = Request("r", [1, 2], SamplingParams(max_tokens=8, frequency_penalty=0.5), 0.0, 1.0, 1.0)
    assert req.output_counts() == ()
    for t in (5, 9, 5):
        req.record_token(t, 0.0)
    assert dict(zip(*req.output_counts())) == {5: 2, 9: 1}
    req.record_token(9, 0.0)
    assert dict(zip(*req.output_counts())) == {5: 2, 9: 2}
    req.output_token_ids = [7]  # outputs replaced
    assert dict(zip(*req.output_counts())) == {7: 1}
    unpenalized = Request("r", [1], SamplingParams(max_tokens=8), 0.0, 1.0, 1.0)
    unpenalized.record_token(3, 0.0)
    assert unpenalized.output_counts() == ()


@pytest.mark.parametrize("kw", [{"presence_penalty": 2.5}, {"frequency_penalty": -2.01}, {"presence_penalty": math.nan},
                                {"frequency_penalty": True}, {"presence_penalty": "1"}, {"repetition_penalty": 0.0},
                                {"repetition_penalty": -1.0}, {"repetition_penalty": 2.01},
                                {"repetition_penalty": 5e-324}, {"repetition_penalty": 0.0099},
                                {"repetition_penalty": math.inf}, {"repetition_penalty": True}])
def test_bad_penalties_name_their_parameter(kw):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.param == next(iter(kw))


def _repetition_greedy(path, prompt, max_new, penalty):
    """Greedy decoding over transformers' logits through its RepetitionPenaltyLogitsProcessor."""
    model, ids = hf_model(path), torch.tensor([list(prompt)])
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(ids).logits[:, -1].float()
        ids = torch.cat([ids, processor(ids, logits).argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("model,cache_mode", [("opt-60x3", "kv"), ("opt-60x3", "hidden"), ("opt-60x3", "auto"),
                                              ("llama-48x3", "kv")])
def test_greedy_with_a_repetition_penalty_is_transformers(model, cache_mode):
    """Prompt and output tokens penalized, as transformers' processor does over its input ids;
    batched with unpenalized and differently penalized requests."""
    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8, cache_mode=cache_mode)
    batch = prompts(4, seed=12)
    penalties = [1.3, 0.8, 2.0, 1.0]
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=r) for r in penalties]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    for prompt, r, out in zip(batch, penalties, outs):
        assert list(out.outputs[0].token_ids) == _repetition_greedy(path, prompt, 14, r), r
    plain = llm.generate([{"prompt_token_ids": p} for p in batch[:3]],
                         SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs[:3]] != [o.outputs[0].token_ids for o in plain]  # it acts


def test_repetition_penalty_shapes_the_sampled_distribution():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, VOCAB, generator=g)
    seen = (4, 17, 250, 3)
    seq = _seq(temperature=0.7, top_k=50)._replace(repetition_penalty=1.4, seen_tokens=seen)
    got = repeated(logits, [seq, _seq(), _seq()._replace(repetition_penalty=0.5, seen_tokens=(9,))])
    want = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([list(seen)]), logits[:1].clone())[0]
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], logits[1])  # rows without a penalty are untouched
    r = float(logits[2, 9])
    assert float(got[2, 9]) == pytest.approx(r / 0.5 if r >= 0 else r * 0.5)
    torch.testing.assert_close(distribution(got[0], seq), _transformers_distribution(want, 0.7, 50, 1.0, 0.0, ()),
                               atol=1e-6, rtol=1e-5)


def test_seen_tokens_follow_the_prompt_the_outputs_and_a_resume():
    req = Request("r", [1, 2, 1], SamplingParams(max_tokens=8, repetition_penalty=1.2), 0.0, 1.0, 1.0)
    assert req.seen_tokens() == (1, 2)
    for t in (5, 2, 5, 9):
        req.record_token(t, 0.0)
    assert req.seen_tokens() == (1, 2, 5, 9)
    req.output_token_ids = [7]  # outputs replaced
    assert req.seen_tokens() == (1, 2, 7)
    assert Request("r", [1], SamplingParams(max_tokens=8), 0.0, 1.0, 1.0).seen_tokens() == ()


def test_special_tokens_show_only_when_asked_and_the_token_that_ends_an_output_never_unless_asked():
    """skip_special_tokens and include_stop_str_in_output, as vLLM's: the text of each output against
    transformers' decode of its tokens. The token that ends an output (EOS, a stop token id) is in its
    token ids, and in its text only with include_stop_str_in_output."""
    llm = LLM(tiny_model("opt-60x3"))
    tok = llm.tokenizer
    pad, eos, stop_id = tok.pad_token_id, tok.eos_token_id, 41
    prompt = {"prompt_token_ids": [3, 9, 27, 81]}

    def out(**kw):
        return llm.generate(prompt, SamplingParams(temperature=0.0, **kw))[0].outputs[0]

    pads = out(max_tokens=3, logit_bias={pad: 100.0})
    assert list(pads.token_ids) == [pad] * 3 and pads.text == ""
    shown = out(max_tokens=3, logit_bias={pad: 100.0}, skip_special_tokens=False)
    assert shown.text == tok.decode([pad] * 3, skip_special_tokens=False) == "<pad>" * 3
    for skip in (True, False):
        ended = out(max_tokens=5, min_tokens=2, logit_bias={pad: 50.0, eos: 100.0}, skip_special_tokens=skip)
        assert list(ended.token_ids) == [pad, pad, eos] and ended.finish_reason == "stop"
        assert ended.text == ("" if skip else "<pad><pad>")
    kept = out(max_tokens=5, logit_bias={eos: 100.0}, skip_special_tokens=False, include_stop_str_in_output=True)
    assert list(kept.token_ids) == [eos] and kept.text == "</s>"
    by_id = out(max_tokens=5, min_tokens=1, logit_bias={stop_id: 100.0}, stop_token_ids=[stop_id])
    first = by_id.token_ids[0]  # min_tokens holds the stop id off the first token
    assert list(by_id.token_ids) == [first, stop_id] and by_id.stop_reason == stop_id
    assert by_id.text == tok.decode([first]) != tok.decode([first, stop_id])
    assert out(max_tokens=5, min_tokens=1, logit_bias={stop_id: 100.0}, stop_token_ids=[stop_id],
               include_stop_str_in_output=True).text == tok.decode([first, stop_id])


class _AllowedOnly:
    """transformers logits processor: every token but the allowed ones at -inf."""

    def __init__(self, allowed):
        self.allowed = list(allowed)

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, -math.inf)
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


@pytest.mark.parametrize("model", ["opt-60x3", "llama-48x3"])
def test_allowed_token_ids_are_transformers_with_every_other_token_masked(model):
    """Greedy: transformers' generate with the other tokens at -inf, token for token; sampled: only
    allowed tokens; with a structure too: what both allow."""
    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8)
    allowed = [7, 19, 23, 41, 42, 200, llm.tokenizer.eos_token_id]
    hf = hf_model(path)
    for prompt in prompts(3, seed=11):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           logits_processor=LogitsProcessorList([_AllowedOnly(allowed)]),
                           eos_token_id=llm.tokenizer.eos_token_id, pad_token_id=0)[0, len(prompt):].tolist()
        got = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=12,
                                                                        allowed_token_ids=allowed))[0].outputs[0]
        assert list(got.token_ids) == want
    sampled = llm.generate([{"prompt_token_ids": p} for p in prompts(4, seed=12)], SamplingParams(
        temperature=1.5, seed=3, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed[:-1]))
    assert all(set(o.outputs[0].token_ids) <= set(allowed) for o in sampled)
    digits = [t for t in range(llm.tokenizer.vocab_size) if llm.tokenizer.decode([t]) in ("1", "2", "3")]
    held = llm.generate({"prompt_token_ids": prompts(1, seed=13)[0]}, SamplingParams(
        temperature=1.0, seed=5, max_tokens=8, allowed_token_ids=digits[:2] + [llm.tokenizer.eos_token_id],
        structured_output=StructuredOutput("regex", "[0-9]{4}")))[0].outputs[0]
    assert set(held.token_ids[:-1]) <= set(digits[:2]) and len(held.text) == 4, held


def test_allowed_token_ids_outside_the_vocabulary_or_empty_are_refused():
    llm = LLM(tiny_model("opt-60x3"))
    for ids, match in (([5, 10**9], r"allowed_token_ids must be in \[0, "), ([], "non-empty")):
        with pytest.raises(InvalidRequest, match=match):
            llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, allowed_token_ids=ids))


def test_include_stop_str_in_output_keeps_the_stop_string():
    llm = LLM(tiny_model("opt-60x3"))
    prompt = {"prompt_token_ids": [3, 9, 27, 81]}
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    at = free.index(stop)
    for include, want in ((False, free[:at]), (True, free[:at + len(stop)])):
        got = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=include))[0].outputs[0]
        assert got.text == want and got.stop_reason == stop


@pytest.mark.parametrize("model", ["opt-60x3", "llama-48x3"])
def test_bad_words_are_transformers_bad_words_ids(model):
    """Words the free greedy reply has (one token, and two), banned: transformers' generate with
    bad_words_ids (the same token sequences), token for token, and the reply changes."""
    from aptray.sampling_params import bad_words_token_ids

    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8)
    tok, hf = llm.tokenizer, hf_model(path)
    greedy = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    tested = set()
    for prompt in prompts(6, seed=21):
        free = list(llm.generate({"prompt_token_ids": prompt}, SamplingParams(**greedy))[0].outputs[0].token_ids)
        spans = [free[i:i + n] for n in (1, 2, 3) for i in range(len(free) - n + 1)]
        words = [w for w in (tok.decode(span).strip() for span in spans) if w.isalpha()]
        # words whose own tokens (as written or after a space) are in the reply, so that the ban bites:
        # the first of one token and the first of more
        bites = {}
        for w in words:
            for seq in bad_words_token_ids(tok, [w]):
                if _contains(free, seq):
                    bites.setdefault(min(len(seq), 2), w)
        biting = sorted(set(bites.values()))
        if not biting:
            continue
        seqs = bad_words_token_ids(tok, biting)
        tested.update(len(seq) for seq in seqs if _contains(free, seq))
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, bad_words_ids=[list(s) for s in seqs], pad_token_id=0)[0, len(prompt):]
        got = list(llm.generate({"prompt_token_ids": prompt}, SamplingParams(**greedy, bad_words=biting))[0]
                   .outputs[0].token_ids)
        assert got == want.tolist() and got != free, biting
        assert not any(_contains(got, seq) for seq in seqs)
    assert 1 in tested and any(n > 1 for n in tested), tested  # one-token bans and longer ones both bit


def _contains(tokens: list[int], seq: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i:i + len(seq)]) == seq for i in range(len(tokens) - len(seq) + 1))
