"""Log-probabilities (SamplingParams.logprobs) against transformers: each output token's, its rank and
the most likely tokens', under the model's own distribution, for greedy and sampled requests, every cache
mode; the bias and temperature do not change them; asked or not, the tokens stay the same."""
from __future__ import annotations

import math

import pytest
import torch

from aptray import LLM, SamplingParams
from aptray.model.sampler import MIN_LOGPROB, token_logprobs
from aptray.plan import SeqPlan
from aptray.sampling_params import MAX_LOGPROBS, InvalidRequest
from tiny_models import hf_model, prompts, tiny_model

torch.set_num_threads(1)


def _hf_logprobs(path: str, prompt: list[int], outputs: list[int]) -> torch.Tensor:
    """transformers' log-softmax at the positions that predicted each output token: [len(outputs), V]."""
    ids = torch.tensor([list(prompt) + list(outputs)])
    with torch.inference_mode():
        logits = hf_model(path)(ids).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)


def _check_rank(lp, ref_row: torch.Tensor, token: int) -> None:
    """lp.rank is 1 + the tokens transformers finds more likely (within 2e-4: near ties may go either way)."""
    value = float(ref_row[token])
    assert 1 + int((ref_row > value + 2e-4).sum()) <= lp.rank <= 1 + int((ref_row > value - 2e-4).sum())


def _check_against_transformers(path, prompt, completion, k):
    ref = _hf_logprobs(path, prompt, completion.token_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    for i, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert lp.logprob == pytest.approx(float(ref[i, token]), abs=2e-4), i
        _check_rank(lp, ref[i], token)
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        torch.testing.assert_close(torch.tensor(values), torch.topk(ref[i], k).values, atol=2e-4, rtol=0)
        for token_id, value in lp.top:  # ties may order ids differently: check each id's own value
            assert value == pytest.approx(float(ref[i, token_id]), abs=2e-4)


@pytest.mark.parametrize("model,cache_mode", [("opt-60x3", "kv"), ("opt-60x3", "hidden"), ("opt-60x3", "auto"),
                                              ("llama-48x3", "kv")])
def test_logprobs_are_transformers(model, cache_mode):
    """Greedy and sampled requests in one batch, asking for 0, 1, 5 and 20 top tokens, or none."""
    path = tiny_model(model)
    llm = LLM(path, max_num_seqs=8, cache_mode=cache_mode)
    batch = prompts(6, seed=9)
    asks = [(0.0, 5), (0.0, 0), (1.0, 1), (0.8, 20), (0.0, None), (1.3, 3)]
    params = [SamplingParams(temperature=t, seed=i, max_tokens=7, ignore_eos=True, logprobs=k)
              for i, (t, k) in enumerate(asks)]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    for prompt, (_, k), out in zip(batch, asks, outs):
        completion = out.outputs[0]
        if k is None:
            assert completion.logprobs is None
            continue
        _check_against_transformers(path, prompt, completion, k)
    # asking changes no token: the same requests without logprobs
    plain = llm.generate([{"prompt_token_ids": p} for p in batch],
                         [SamplingParams(temperature=t, seed=i, max_tokens=7, ignore_eos=True)
                          for i, (t, _) in enumerate(asks)])
    assert [o.outputs[0].token_ids for o in plain] == [o.outputs[0].token_ids for o in outs]


def test_logprobs_are_the_models_own_whatever_the_bias():
    """A +100 bias forces a token the model finds unlikely: its reported log-probability is the model's,
    not the biased distribution's (about 0)."""
    path = tiny_model("opt-60x3")
    llm = LLM(path)
    prompt = [3, 14, 15, 92, 65]
    ref = _hf_logprobs(path, prompt, [0])[0]
    unlikely = int(torch.argmin(ref))
    sp = SamplingParams(temperature=0.7, seed=1, max_tokens=3, ignore_eos=True, logit_bias={unlikely: 100.0},
                        logprobs=2)
    completion = llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0]
    assert list(completion.token_ids) == [unlikely] * 3
    assert completion.logprobs[0].logprob == pytest.approx(float(ref[unlikely]), abs=2e-4)
    assert completion.logprobs[0].logprob < -1.0
    assert [t for t, _ in completion.logprobs[0].top] == torch.topk(ref, 2).indices.tolist()
    _check_against_transformers(path, prompt, completion, 2)


def test_token_logprobs_floor_and_non_finite_rows():
    """-inf (a token the model rules out) is reported as MIN_LOGPROB, a JSON number; a row of NaN
    logits fails that request alone."""
    logits = torch.randn(3, 50)
    logits[0, 7] = -math.inf
    logits[1] = math.nan
    seqs = [SeqPlan(str(i), (1,), 0, "kv", (0,), True, logprobs=50) for i in range(3)]
    out, errors = token_logprobs(logits, seqs, [7, 2, 4])
    assert out[0].logprob == MIN_LOGPROB and out[0].top[-1] == (7, MIN_LOGPROB) and out[0].rank == 50
    assert set(errors) == {1} and "not finite" in errors[1]
    assert out[2].logprob == pytest.approx(float(torch.log_softmax(logits[2], -1)[4]))
    assert token_logprobs(logits, [s._replace(logprobs=None) for s in seqs], [1, 2, 3]) == ({}, {})


@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, 2**31, True, 1.5, "3"])
def test_bad_logprobs_name_their_parameter(value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(logprobs=value)
    assert e.value.param == "logprobs"


def test_logprobs_survive_preemption_and_resume_marks_the_unknown():
    """A cache too small for the batch preempts (recompute): the re-prefilled requests keep one
    log-probability per token, still transformers'. A request resumed with outputs made elsewhere has
    None for those (they were never sampled here) and real ones after."""
    path = tiny_model("opt-60x3")
    llm = LLM(path, max_num_seqs=4, num_cache_blocks=10, block_size=4)
    batch = prompts(4, seed=3, lo=8, hi=12)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for prompt, out in zip(batch, outs):
        _check_against_transformers(path, prompt, out.outputs[0], 2)

    engine, prompt = llm.engine, batch[0]
    done = list(outs[0].outputs[0].token_ids)
    engine.resume_request("again", prompt, sp, done[:5], [0.0] * 5, 0.0)
    while engine.has_unfinished():
        final = [o for o in engine.step() if o.finished]
    completion = final[0].outputs[0]
    assert list(completion.token_ids) == done
    assert completion.logprobs[:5] == [None] * 5
    before = outs[0].outputs[0].logprobs[5:]
    assert [lp.logprob for lp in completion.logprobs[5:]] == pytest.approx([lp.logprob for lp in before], abs=1e-5)
    assert [[t for t, _ in lp.top] for lp in completion.logprobs[5:]] == [[t for t, _ in lp.top] for lp in before]


@pytest.mark.parametrize("model,cache_mode,chunked", [("opt-60x3", "kv", False), ("opt-60x3", "hidden", True),
                                                      ("llama-48x3", "kv", True)])
def test_prompt_logprobs_are_transformers(model, cache_mode, chunked):
    """Each prompt token after the first, scored by the rows before it: in one prefill, or over chunks
    of 8 tokens (a chunk's last row scores the next chunk's first token). The prompts share their
    first 24 tokens, and the one that asks must not take them from the prefix cache."""
    path = tiny_model(model)
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=8) if chunked else {}
    llm = LLM(path, max_num_seqs=4, cache_mode=cache_mode, block_size=4, **kw)
    shared = prompts(1, seed=4, lo=24, hi=25)[0]
    first, second = shared + [7, 8, 9], shared + [10, 11, 12, 13]
    llm.generate({"prompt_token_ids": first}, SamplingParams(max_tokens=1))  # publishes the shared blocks
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=4, logprobs=1)
    out = llm.generate({"prompt_token_ids": second}, sp)[0]
    ref = _hf_logprobs(path, second[:1], second[1:])  # row i scores prompt token i + 1
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(second)
    for i, lp in enumerate(out.prompt_logprobs[1:]):
        assert lp.logprob == pytest.approx(float(ref[i, second[i + 1]]), abs=2e-4), i
        _check_rank(lp, ref[i], second[i + 1])
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), torch.topk(ref[i], 4).values, atol=2e-4,
                                   rtol=0)
    _check_against_transformers(path, second, out.outputs[0], 1)
    assert llm.generate({"prompt_token_ids": second}, SamplingParams(max_tokens=1))[0].prompt_logprobs is None
