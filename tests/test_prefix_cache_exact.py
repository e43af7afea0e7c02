"""Prefix caching on the real CPU engine gives transformers' greedy tokens: prompts sharing a system
prompt, follow-up turns resending a conversation, in every cache mode and policy, with chunked
prefill, with a cached prefix evicted and recomputed mid-run, under preemption, and with a cached
hidden prefix converted for KV requests."""
from __future__ import annotations

import pytest
import torch

from aptray import LLM, SamplingParams
from tiny_models import hf_greedy, tiny_model

torch.set_num_threads(1)

SYSTEM = [3] + [(37 * i) % 480 + 10 for i in range(23)]  # 24 tokens shared by every conversation


def tails(seed: int, count: int, lo: int = 3, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 500, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def run_waves(llm: LLM, waves, max_tokens: int = 6) -> dict[str, list[int]]:
    """Each wave's prompts join once the previous wave has run `join_after` steps (None: finished)."""
    eng = llm.engine
    out: dict[str, list[int]] = {}
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for wave, join_after in waves:
        for rid, prompt in wave:
            eng.add_request(rid, prompt, sp)
        steps = 0
        while eng.has_unfinished() and (join_after is None or steps < join_after):
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o.outputs[0].token_ids
            steps += 1
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out


def check(path: str, prompts: dict[str, list[int]], got: dict[str, list[int]], max_tokens: int = 6) -> None:
    for rid, prompt in prompts.items():
        assert tuple(got[rid]) == hf_greedy(path, tuple(prompt), max_tokens), f"{rid} diverged"


def chat_waves(seed: int):
    """Two waves of three conversations on the system prompt."""
    first = {f"a{i}": SYSTEM + t for i, t in enumerate(tails(seed, 3))}
    second = {f"b{i}": SYSTEM + t for i, t in enumerate(tails(seed + 1, 3))}
    return first, second


CASES = [  # model, cache_mode, hidden attention, scheduler, extra engine args
    ("opt-60x3", "kv", "absorbed", "fcfs", {}),
    ("opt-60x3", "hidden", "absorbed", "sarathi", {}),
    ("opt-40x5", "hidden", "recompute", "apt", {}),
    ("opt-64x4", "hybrid", "absorbed", "apt", {"iteration_shape": "mixed"}),
    ("opt-64x4", "hybrid", "absorbed", "fcfs", {"enable_chunked_prefill": True, "max_num_batched_tokens": 16}),
    ("llama-48x3", "kv", "recompute", "sarathi", {"max_num_batched_tokens": 16}),
    ("llama-96x3", "hidden", "recompute", "fcfs", {}),
    ("llama-96x3", "hybrid", "recompute", "apt", {"enable_chunked_prefill": True, "max_num_batched_tokens": 16}),
]


@pytest.mark.parametrize("name,mode,attention,policy,extra", CASES)
def test_shared_prompts_and_follow_up_turns_match_transformers(name, mode, attention, policy, extra):
    path = tiny_model(name)
    llm = LLM(path, cache_mode=mode, hidden_attention=attention, scheduler=policy, block_size=4, **extra)
    first, second = chat_waves(11)
    got = run_waves(llm, [(list(first.items()), 3), (list(second.items()), None)])
    # the next turn of each first-wave conversation: all of it so far, the reply, a new message
    third = {f"c{i}": first[f"a{i}"] + got[f"a{i}"] + t for i, t in enumerate(tails(13, 3))}
    got |= run_waves(llm, [(list(third.items()), None)])
    check(path, first | second | third, got)
    stats = llm.engine.scheduler.stats
    assert stats["prefix_hit_tokens"] >= 3 * 24, dict(stats)  # at least the third turns' conversations
    llm.engine.blocks.check()
    assert not llm.engine.blocks.owners()


@pytest.mark.parametrize("name,mode", [("opt-60x3", "kv"), ("opt-40x5", "hidden"), ("llama-48x3", "kv")])
def test_an_evicted_prefix_is_recomputed_exactly(name, mode):
    """A pool of 96 tokens: unrelated requests evict the conversation's cached blocks, part of them or
    all, before its next turn comes."""
    path = tiny_model(name)
    llm = LLM(path, cache_mode=mode, block_size=4, num_cache_blocks=24 if mode == "kv" else 12, max_num_seqs=2)
    turn1 = {"t1": SYSTEM + [7, 8, 9, 10, 11]}
    got = run_waves(llm, [(list(turn1.items()), None)])
    turn2 = {"t2": turn1["t1"] + got["t1"] + [12, 13, 14]}
    others = {f"x{i}": t + t for i, t in enumerate(tails(5, 3, 20, 30))}
    got |= run_waves(llm, [(list(turn2.items()), None), (list(others.items()), None)])
    evicted_before = llm.engine.blocks.evictions
    turn3 = {"t3": turn2["t2"] + got["t2"] + [15]}
    got |= run_waves(llm, [(list(turn3.items()), None)])
    check(path, turn1 | turn2 | others | turn3, got)
    assert evicted_before > 0, "nothing was evicted: the pool did not bind"
    stats = llm.engine.scheduler.stats
    assert 0 < stats["prefix_hit_tokens"] < stats["prefix_queried_tokens"], dict(stats)


@pytest.mark.parametrize("policy,mode", [("fcfs", "kv"), ("sarathi", "hybrid"), ("apt", "hybrid")])
def test_preempted_requests_come_back_on_their_cached_blocks(policy, mode):
    path = tiny_model("opt-64x4")
    llm = LLM(path, cache_mode=mode, scheduler=policy, block_size=4, num_cache_blocks=30, max_num_seqs=8,
              ttft_slo=0.05, tbt_slo=0.02)
    prompts = {f"p{i}": SYSTEM + t for i, t in enumerate(tails(21, 8, 4, 16))}
    got = run_waves(llm, [(list(prompts.items()), None)], max_tokens=12)
    check(path, prompts, got, max_tokens=12)
    stats = llm.engine.scheduler.stats
    assert stats["preemptions"] + stats["conversions_to_hidden"] > 0, f"the pool did not bind: {dict(stats)}"
    assert stats["prefix_hit_tokens"] > 0
    llm.engine.blocks.check()


@pytest.mark.parametrize("name,attention", [("opt-60x3", "absorbed"), ("llama-96x3", "recompute")])
def test_kv_requests_convert_a_cached_hidden_prefix(name, attention):
    """The prefix is cached as hidden (requests admitted as hidden); the next requests are admitted
    as KV and start from it by one projection into their own KV blocks (rotary positions too)."""
    path = tiny_model(name)
    llm = LLM(path, cache_mode="hybrid", hidden_attention=attention, block_size=4)
    config = llm.engine.scheduler.config
    config.cache_mode = "hidden"  # admission kinds follow the mode: this wave is hidden
    first = {f"h{i}": SYSTEM + t for i, t in enumerate(tails(31, 2))}
    got = run_waves(llm, [(list(first.items()), None)])
    config.cache_mode = "kv"  # and this one KV
    second = {f"k{i}": SYSTEM + t for i, t in enumerate(tails(32, 3))}
    got |= run_waves(llm, [(list(second.items()), None)])
    check(path, first | second, got)
    stats = llm.engine.scheduler.stats
    assert stats["prefix_conversions"] == 3, dict(stats)
    llm.engine.blocks.check()


def test_prefix_caching_off_computes_everything():
    path = tiny_model("opt-60x3")
    llm = LLM(path, block_size=4, enable_prefix_caching=False)
    first, second = chat_waves(41)
    got = run_waves(llm, [(list(first.items()), None), (list(second.items()), None)])
    check(path, first | second, got)
    assert not any(k.startswith("prefix_") for k in llm.engine.scheduler.stats)
    assert llm.engine.blocks.num_evictable == 0


@pytest.mark.parametrize("mode,caching", [("kv", True), ("hidden", True), ("kv", False)])
def test_each_output_counts_its_cached_prompt_tokens(mode, caching):
    """RequestOutput.num_cached_tokens (vLLM's): the prompt tokens its admission found cached, here the
    24-token system prompt (6 blocks of 4) once a first request published it; 0 with caching off.
    Over a batch they sum to the scheduler's prefix hit counter."""
    llm = LLM(tiny_model("opt-60x3"), cache_mode=mode, block_size=4, enable_prefix_caching=caching)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    [first] = llm.generate({"prompt_token_ids": SYSTEM + [7, 8, 9]}, sp)
    assert first.num_cached_tokens == 0
    outs = llm.generate([{"prompt_token_ids": SYSTEM + t} for t in ([10, 11, 12, 13], [14, 15], [16])], sp)
    assert [o.num_cached_tokens for o in outs] == [24 if caching else 0] * 3
    if caching:
        assert sum(o.num_cached_tokens for o in [first, *outs]) == llm.engine.scheduler.stats["prefix_hit_tokens"]
