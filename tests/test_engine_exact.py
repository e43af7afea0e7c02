"""The engine's greedy tokens equal transformers' generate in every cache mode, on random models."""
from __future__ import annotations

import logging

import pytest
import torch

from aptray import LLM, SamplingParams
from aptray.config import EngineConfig
from tiny_models import hf_greedy, hf_last_logits, prompts, tiny_model

torch.set_num_threads(1)

CASES = [
    # model, cache_mode, hidden_attention, block_size
    ("opt-60x3", "kv", "absorbed", 1),
    ("opt-60x3", "hidden", "absorbed", 4),
    ("opt-60x3", "hidden", "recompute", 16),
    ("opt-40x5", "kv", "absorbed", 16),
    ("opt-40x5", "hidden", "absorbed", 1),
    ("opt-40x5", "hidden", "recompute", 4),
    ("opt-64x4", "hidden", "absorbed", 16),
    ("opt-64x4", "hidden", "recompute", 1),
    ("llama-48x3", "kv", "recompute", 4),
    ("llama-48x3", "hidden", "recompute", 1),
    ("llama-96x3", "kv", "recompute", 16),
    ("llama-96x3", "hidden", "recompute", 4),
    ("llama-gqa-64x4x2", "kv", "recompute", 4),
]


def run_with_joins(llm: LLM, batch: list[list[int]], max_tokens: list[int], upgrade_after: int | None = None):
    """Half the requests start, the rest join after two steps; returns {id: (tokens, last logits)}."""
    eng = llm.engine
    ids = [f"r{i}" for i in range(len(batch))]
    half = len(batch) // 2
    last_logits, tokens = {}, {}

    def add(i):
        eng.add_request(ids[i], batch[i], SamplingParams(temperature=0, max_tokens=max_tokens[i], ignore_eos=True))

    for i in range(half):
        add(i)
    steps = 0
    while eng.has_unfinished() or steps < 2:
        if steps == 2:
            for i in range(half, len(batch)):
                add(i)
        if upgrade_after is not None and steps == upgrade_after:
            for rid in ids[:half]:
                eng.scheduler.request_upgrade(rid)  # hidden -> KV in the middle of the request
        step = eng.step(want_logits=True)
        for out in step:
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        for rid, row in (step.result.logits or {}).items():
            last_logits[rid] = row
        steps += 1
    return {rid: (tokens[rid], last_logits[rid]) for rid in ids}


def check_against_transformers(path, batch, max_tokens, results):
    for i, toks in enumerate(batch):
        got, logits = results[f"r{i}"]
        assert tuple(got) == hf_greedy(path, tuple(toks), max_tokens[i]), f"request {i} diverged"
        ref = hf_last_logits(path, toks + got[:-1])
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,mode,attention,block_size", CASES)
def test_greedy_matches_transformers(name, mode, attention, block_size):
    path = tiny_model(name)
    llm = LLM(path, cache_mode=mode, hidden_attention=attention, block_size=block_size)
    batch = prompts(10, seed=block_size)
    max_tokens = [4 + (3 * i) % 11 for i in range(len(batch))]  # finish at different steps
    check_against_transformers(path, batch, max_tokens, run_with_joins(llm, batch, max_tokens))


@pytest.mark.parametrize("name,attention", [("opt-60x3", "absorbed"), ("opt-40x5", "recompute"),
                                            ("llama-48x3", "recompute")])
def test_hidden_to_kv_conversion_mid_request(name, attention):
    path = tiny_model(name)
    llm = LLM(path, cache_mode="hidden", hidden_attention=attention, block_size=4)
    batch = prompts(8, seed=7)
    max_tokens = [12] * len(batch)
    results = run_with_joins(llm, batch, max_tokens, upgrade_after=4)
    assert llm.engine.scheduler.stats["conversions_to_kv"] == len(batch) // 2
    check_against_transformers(path, batch, max_tokens, results)


@pytest.mark.parametrize("name", ["opt-60x3", "llama-96x3"])
def test_hybrid_under_a_binding_pool_is_exact(name):
    """Few blocks: requests are admitted as KV or hidden, preempted, converted; outputs stay exact."""
    path = tiny_model(name)
    llm = LLM(path, cache_mode="hybrid", block_size=4, num_cache_blocks=40, max_num_seqs=16)
    batch = prompts(12, seed=3)
    max_tokens = [10 + i % 5 for i in range(len(batch))]
    results = run_with_joins(llm, batch, max_tokens)
    stats = llm.engine.scheduler.stats
    assert stats["conversions_to_kv"] + stats["preemptions"] > 0, f"the pool did not bind: {dict(stats)}"
    check_against_transformers(path, batch, max_tokens, results)
    llm.engine.blocks.check()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_a_hidden_cache_that_cannot_pay_is_refused_with_the_reason(caplog):
    """Named in a config, the hidden cache runs or the config is refused: never a silent fallback.
    "auto" picks it where it pays, and says why it did not."""
    for mode in ("hybrid", "hidden"):
        with pytest.raises(ValueError, match=r"cannot pay here.*r = d / \(2 n_kv D / tp\) = 64 / 64.*grouped-query"):
            LLM(tiny_model("llama-gqa-64x4x2"), cache_mode=mode)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 shards K and V") as refused:
        EngineConfig(model=tiny_model("opt-64x4"), cache_mode="hybrid", tensor_parallel_size=2)
    assert "tensor_parallel_size=1" in str(refused.value)
    with caplog.at_level(logging.INFO, logger="aptray"):
        llm = LLM(tiny_model("llama-gqa-64x4x2"), cache_mode="auto")
    assert llm.config.cache_mode == "kv" and "grouped-query" in caplog.text
    assert LLM(tiny_model("opt-64x4"), cache_mode="auto", num_cache_blocks=16).config.cache_mode == "hybrid"
