"""Bad input to the offline API fails with an exception that names the problem."""
from __future__ import annotations

import pytest

from aptray import LLM, SamplingParams
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("opt-60x3"))


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []})


def test_prompt_over_context(llm):
    with pytest.raises(ValueError, match=r"prompt has 300 tokens; the model context is 256"):
        llm.generate({"prompt_token_ids": [5] * 300})


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate({"prompt_token_ids": [5, 10**6]})


@pytest.mark.parametrize("stop_ids", [[-1], [10**6], [5, 2**63]])
def test_stop_token_ids_outside_vocabulary(llm, stop_ids):
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, "):
        llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2, stop_token_ids=stop_ids))


@pytest.mark.parametrize("bad", [0, -3])
def test_max_tokens_below_one(bad):
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=bad)


@pytest.mark.parametrize("kwargs,match", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                          ({"top_k": -5}, "top_k"), ({"ttft_slo": 0}, "ttft_slo")])
def test_bad_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder with a config.json"):
        LLM(str(tmp_path / "no-such-model"))


def test_unknown_cache_mode():
    with pytest.raises(ValueError, match="cache_mode must be one of"):
        LLM(tiny_model("opt-60x3"), cache_mode="fast")


def test_engine_still_serves_after_bad_input(llm):
    with pytest.raises(ValueError):
        llm.generate({"prompt_token_ids": []})
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_generation_stops_at_a_stop_string_and_at_context(llm):
    full = llm.generate("hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop = full.text[3:6]
    cut = llm.generate("hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))
    out = cut[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and stop not in out.text
    long = llm.generate({"prompt_token_ids": [5] * 250}, SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(long[0].outputs[0].token_ids) == 6 and long[0].outputs[0].finish_reason == "length"


def test_request_larger_than_the_whole_pool_is_refused():
    small = LLM(tiny_model("opt-60x3"), num_cache_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="needs more cache than the whole pool holds"):
        small.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=20))
    out = small.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 6


def test_prompt_over_the_step_budget_is_chunked_by_policies_that_chunk(llm):
    prompt = {"prompt_token_ids": [3] + list(range(10, 49))}
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with pytest.raises(ValueError, match="over max_num_batched_tokens"):
        LLM(tiny_model("opt-60x3"), max_num_batched_tokens=16).generate(prompt, sp)
    want = llm.generate(prompt, sp)[0].outputs[0].token_ids
    for policy in ("sarathi", "apt"):
        chunked = LLM(tiny_model("opt-60x3"), scheduler=policy, max_num_batched_tokens=16)
        assert chunked.generate(prompt, sp)[0].outputs[0].token_ids == want


def test_resumed_request_continues_exactly(llm):
    """A request re-admitted with its generated tokens (after a fault) ends as if never interrupted."""
    prompt = [3] + list(range(20, 40))
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs[0].token_ids
    eng = llm.engine
    eng.resume_request("resumed", prompt, sp, want[:5], [0.0] * 5, arrival_time=0.0)
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done["resumed"].outputs[0].token_ids == want
    assert done["resumed"].metrics.num_preemptions == 1


@pytest.mark.parametrize("kwargs", [{"seed": 2**50}, {"top_k": 2**31}])
def test_out_of_range_sampling_integers(kwargs):
    with pytest.raises(ValueError, match="seed|top_k"):
        SamplingParams(**kwargs)


def test_stop_strings_cut_where_a_full_decode_would_and_decode_each_token_once(llm):
    """Stop strings are found as the text grows (each step decodes a window around the new token):
    the cut equals the rule applied to the full decode at every length, for stop strings at many
    places and several at once; and the decode work stays linear in the output length. (Stop strings
    match whole characters: a character split over tokens is not matched as its partial decode's
    U+FFFD, as the old whole decode did, so the picks avoid U+FFFD.)"""
    sp = dict(temperature=0, max_tokens=60, ignore_eos=True)
    full = llm.generate("hello", SamplingParams(**sp))[0].outputs[0]
    tok = llm.tokenizer

    def expected(stops):
        for n in range(1, len(full.token_ids) + 1):  # the first length whose full decode holds a stop
            text = tok.decode(full.token_ids[:n], skip_special_tokens=True)
            for s in stops:
                if s in text:
                    return text[:text.find(s)], n, s
        return full.text, len(full.token_ids), None
    starts = [i for i in range(len(full.text) - 5) if "\ufffd" not in full.text[i:i + 5]]
    assert len(starts) >= 4, full.text
    for start in starts[::max(1, len(starts) // 4)]:
        for stops in ([full.text[start:start + 3]], ["\u00ff\u00fe never", full.text[start + 1:start + 5]]):
            out = llm.generate("hello", SamplingParams(**sp, stop=stops))[0].outputs[0]
            text, n, reason = expected(stops)
            assert (out.text, len(out.token_ids), out.stop_reason) == (text, n, reason), stops

    decoded = []
    real_decode = tok.decode
    try:
        tok.decode = lambda ids, **kw: decoded.append(len(ids)) or real_decode(ids, **kw)
        out = llm.generate("hello", SamplingParams(**sp, stop=["\u00ff\u00fe never"]))[0].outputs[0]
    finally:
        del tok.decode
    assert len(out.token_ids) == 60 and sum(decoded) < 6 * 60, sum(decoded)  # whole decodes: 1,830 tokens


def test_a_prompt_or_message_that_is_not_unicode_text_is_refused_by_name(llm):
    """A Python str can hold a lone surrogate, which the tokenizer cannot take (it raised its own
    TypeError); the served APIs refuse the same with 422 (tests/test_fuzz.py)."""
    with pytest.raises(ValueError, match="not Unicode text: a lone surrogate at character 3"):
        llm.generate("abc\ud800")
    with pytest.raises(ValueError, match="lone surrogate at character 0") as e:
        llm.chat([{"role": "user", "content": "\udfff hi"}])
    assert e.value.param == "content"
    out = llm.generate("abc", SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
