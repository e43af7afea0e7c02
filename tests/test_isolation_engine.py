"""One request can never fail another, in the engine: sampling values a hostile client may send,
a row the sampler cannot sample, a request that breaks the model, and an SLO no step can meet.

Outputs are compared with transformers greedy generation on tiny random models."""
import math

import pytest
import torch

from aptray.llm import LLM
from aptray.model.sampler import sample
from aptray.plan import SeqPlan
from aptray.sampling_params import SamplingParams
from aptray.scheduler.step_cost import MIN_PREFILL_SHARE, StepCostModel, binding_tbt_budget, tbt_token_budget
from aptray.step_quarantine import MAX_FAILED_STEPS, StepQuarantine
from tiny_models import hf_greedy, tiny_model

PROMPTS = [[2, 100, 200, 300], [2, 7, 8, 9, 10, 11], [2, 55], [2, 400, 401, 402, 403]]
N = 12


@pytest.fixture(scope="module")
def path():
    return tiny_model("opt-64x4")


def _seq(rid, temperature=1.0, top_p=1.0, top_k=-1, seed=None):
    return SeqPlan(rid, (1,), 0, "kv", (0,), True, temperature, top_p, top_k, seed, 0)


def test_sampler_is_safe_for_every_accepted_value_and_isolates_a_bad_row():
    logits = torch.randn(5, 50)
    logits[3] = float("nan")  # a row the model broke
    seqs = [_seq("denormal-t", temperature=5e-324), _seq("tiny-t", temperature=1e-30),
            _seq("denormal-p", top_p=1e-45, seed=3), _seq("nan-row"), _seq("max-t", temperature=100.0, top_k=2**31 - 1)]
    tokens, errors, own = sample(logits, seqs, torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1).tolist()
    assert tokens[0] == greedy[0] and tokens[1] == greedy[1]  # below MIN_TEMPERATURE: greedy
    assert tokens[2] == greedy[2]  # a vanishing top_p keeps the most likely token only
    assert tokens[3] is None and set(errors) == {3} and "not finite" in errors[3] and not own  # the model's fault
    assert 0 <= tokens[4] < 50


def test_hostile_sampling_values_are_greedy_and_exact(path):
    """Denormal temperature and top_p, through the whole engine: the greedy tokens of transformers."""
    llm = LLM(path, num_cache_blocks=64)
    params = [SamplingParams(temperature=5e-324, max_tokens=N, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=5e-324, max_tokens=N, ignore_eos=True, seed=1),
              SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for i in range(3)], params)
    for i, out in enumerate(outs):
        assert out.outputs[0].finish_reason == "length"
        assert tuple(out.outputs[0].token_ids) == hf_greedy(path, tuple(PROMPTS[i]), N)


def test_an_slo_must_be_finite():
    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="tbt_slo"):
            SamplingParams(tbt_slo=bad)


@pytest.mark.parametrize("scheduler", ["fcfs", "apt"])
def test_a_request_that_breaks_the_model_fails_alone(path, scheduler):
    """A prompt past the model's positions (the admission check bypassed, as a bug elsewhere could)
    makes the real model raise mid-step (its position embedding has no such row). The step's requests are retried one suspect at a time; the
    poisoned one ends with an error after MAX_FAILED_STEPS failures, every other request finishes
    with transformers' tokens."""
    llm = LLM(path, num_cache_blocks=128, scheduler=scheduler, enable_chunked_prefill=True)
    engine = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
    for i, ids in enumerate(PROMPTS):
        engine.add_request(f"r{i}", ids, sp)
    engine.scheduler.requests["r2"].prompt_token_ids.extend([5] * llm.config.spec.max_model_len)
    outs = llm._run([f"r{i}" for i in range(4)], use_tqdm=False)
    poisoned = outs.pop("r2")
    assert poisoned.outputs[0].finish_reason == "error" and "failed" in poisoned.error
    for rid, out in outs.items():
        assert out.outputs[0].finish_reason == "length"
        assert tuple(out.outputs[0].token_ids) == hf_greedy(path, tuple(PROMPTS[int(rid[1])]), N)
    assert not engine.quarantine and not engine.has_unfinished()
    engine.blocks.check()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_quarantine_runs_one_suspect_per_step_and_bounds_every_request():
    q = StepQuarantine()
    assert q.blame(["a", "b", "c"]) == set()
    assert q.held_back(["x", "a", "b", "c"]) == ["b", "c"]  # a runs with the innocent x
    q.clear(["x", "a"])
    assert q.held_back(["b", "c"]) == ["c"]
    assert MAX_FAILED_STEPS == 2
    assert q.blame(["b", "c"]) == {"b", "c"} and not q  # a fault that fails every step ends every request


def test_a_postprocessing_failure_fails_that_request_alone(path):
    """A request whose tokens the detokenizer cannot handle (a tokenizer broken for it) ends with an
    error; the others finish with their exact tokens."""
    llm = LLM(path, num_cache_blocks=64)
    engine = llm.engine
    sp = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True, stop=["never-appears"])
    for i, ids in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", ids, sp)
    decode = engine.tokenizer.decode

    r1_start = hf_greedy(path, tuple(PROMPTS[1]), N)[:3]

    def decode_breaking_on_r1(ids, **kw):  # r1's first tokens, decoded alone or after a letter (decode_continuing)
        if r1_start in (tuple(ids[:3]), tuple(ids[1:4])):
            raise OverflowError("out of range integral type conversion attempted")
        return decode(ids, **kw)
    engine.tokenizer.decode = decode_breaking_on_r1
    try:
        outs = llm._run(["r0", "r1", "r2"], use_tqdm=False)
    finally:
        engine.tokenizer.decode = decode
    assert outs["r1"].outputs[0].finish_reason == "error" and "postprocessing" in outs["r1"].error
    for rid in ("r0", "r2"):
        assert tuple(outs[rid].outputs[0].token_ids) == hf_greedy(path, tuple(PROMPTS[int(rid[1])]), N)


def _calibrated_cost() -> StepCostModel:
    """A step-cost model fitted to steps whose time is 1 ms + 10 us per token + 20 us per sequence."""
    from aptray.plan import BatchPlan
    cost = StepCostModel(16, 32)
    rng = torch.Generator().manual_seed(0)
    for i in range(60):
        n = int(torch.randint(1, 8, (1,), generator=rng))
        tokens = [int(t) for t in torch.randint(1, 200, (n,), generator=rng)]
        seqs = tuple(SeqPlan(f"s{j}", (1,) * t, 0, "kv", (0,), True) for j, t in enumerate(tokens))
        cost.observe(BatchPlan(i, seqs), 1e-3 + 1e-5 * sum(tokens) + 2e-5 * n)
    assert cost.ready
    return cost


def test_no_single_request_slo_shrinks_the_step_budget_for_the_others():
    cost = _calibrated_cost()
    configured, decodes = 512, 8
    loose = tbt_token_budget(cost, configured, 0.006, decodes, 8, 0, 16)
    assert loose > decodes + configured * MIN_PREFILL_SHARE
    # a tight SLO that still leaves the prefill share is honoured (it is a real constraint)
    fair = 0.8 * 0.006 * 0.6
    honoured = tbt_token_budget(cost, configured, fair / 0.8 / 0.6 * 0.75, decodes, 8, 0, 16)
    assert binding_tbt_budget(cost, configured, [0.006, fair / 0.8 / 0.6 * 0.75], decodes, 8, 0, 16) == honoured
    # an SLO no step with room for prefills can meet: treated as lost, the others' SLO sizes the step
    for hostile in (1e-6, 5e-324, 1.01e-3):
        assert binding_tbt_budget(cost, configured, [hostile, 0.006, 0.006], decodes, 8, 0, 16) == loose
    # when every SLO is that tight (the decodes fill the steps), the loosest sizes it, as before
    assert binding_tbt_budget(cost, configured, [1e-6], decodes, 8, 0, 16) == tbt_token_budget(
        cost, configured, 1e-6, decodes, 8, 0, 16)
    assert math.isfinite(loose)
