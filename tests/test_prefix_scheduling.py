"""Every policy with prefix caching, on the token-id executor of test_scheduler: prompts that share
prefixes (a common system prompt, follow-up turns that resend a conversation) must give exactly the
reference tokens, with hits, under pools small enough to evict, preempt and convert; nothing leaks."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.scheduler import make_scheduler
from test_scheduler import (POLICIES, VOCAB, TokenCacheExecutor, with_cache_modes, model_dir,  # noqa: F401 (a fixture)
                            reference, run)

import test_scheduler
from test_apt_cache_choice import _per_step_hidden_cost

SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]


def make_cached(model_dir, num_blocks, **kw):
    kw.setdefault("block_size", 4)
    config = EngineConfig(model=model_dir, **kw)
    hidden = config.hidden_block_size if config.cache_mode != "kv" else 0
    blocks = BlockManager(num_blocks, config.block_size, hidden, enable_caching=True)
    return config, blocks, make_scheduler(config, blocks)


@st.composite
def chat_workloads(draw):
    """Requests on a shared system prompt, and follow-ups that resend an earlier request's prompt and
    its (reference) reply plus a new message, later."""
    n = draw(st.integers(2, 10))
    t, out = 0.0, []
    for i in range(n):
        t += draw(st.floats(0.0, 0.05))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10))
        if out and draw(st.booleans()):
            _, _, prompt, m = out[draw(st.integers(0, len(out) - 1))]
            prompt = prompt + reference(prompt, m) + tail  # the conversation so far
            t += 0.2
        else:
            prompt = SYSTEM[:draw(st.integers(0, len(SYSTEM)))] + tail
        out.append((t, f"r{i}", prompt[:60], draw(st.integers(1, 8))))
    return out


@pytest.mark.parametrize("policy,extra,cache_mode", with_cache_modes(POLICIES))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=chat_workloads(), num_blocks=st.integers(20, 48))
def test_shared_prefixes_give_exact_tokens(model_dir, policy, extra, cache_mode, workload, num_blocks):
    config, blocks, sched = make_cached(model_dir, num_blocks, scheduler=policy, cache_mode=cache_mode,
                                        ttft_slo=0.2, tbt_slo=0.05, **extra)
    outputs = run(sched, blocks, workload)
    for _, rid, prompt, n in workload:
        assert outputs[rid] == reference(prompt, n), rid
    assert not blocks.owners() and blocks.num_free == blocks.num_blocks  # cached blocks are all evictable
    s = sched.stats
    assert s["prefix_hit_tokens"] <= s["prefix_queried_tokens"] and s["prefix_hit_blocks"] <= s["prefix_queried_blocks"]


@pytest.mark.parametrize("policy", ["fcfs", "sarathi", "apt"])
def test_follow_up_turns_hit_and_a_full_pool_evicts(model_dir, policy):
    """Turn 2 resends turn 1 and its reply: all their full blocks hit. Then unrelated requests fill the
    pool, evicting them, and turn 3 computes the conversation again, still exact."""
    config, blocks, sched = make_cached(model_dir, 24, scheduler=policy, cache_mode="kv", ttft_slo=1.0, tbt_slo=1.0)
    turn1 = list(range(100, 130))  # 30 tokens
    turn2 = turn1 + reference(turn1, 8) + [7, 8, 9]  # 41 tokens: 10 full blocks cached
    work = [(0.0, "t1", turn1, 8), (1.0, "t2", turn2, 4)]
    work += [(2.0 + 0.01 * i, f"x{i}", list(range(200 + 40 * i, 236 + 40 * i)), 4) for i in range(3)]
    turn3 = turn2 + reference(turn2, 4) + [5]
    work.append((5.0, "t3", turn3, 4))
    outputs = run(sched, blocks, work)
    assert all(outputs[rid] == reference(p, n) for _, rid, p, n in work)
    assert sched.stats["prefix_hit_tokens"] >= 36  # turn 2's nine blocks (its tenth holds tokens it sampled from)
    assert blocks.evictions > 0


@pytest.mark.parametrize("policy,hit", [("fcfs", 32), ("apt", 0)])
def test_a_cached_hidden_prefix_that_does_not_fit_beside_a_kv_table(model_dir, monkeypatch, policy, hit):
    """A 12-block pool whose only cached blocks are a 32-token hidden prefix (4 blocks, nobody holds
    them), and a 40-token request on it: as KV converting the prefix it needs 10 blocks beside the 4,
    as KV afresh 10, as hidden sharing the prefix 1 more. fcfs tries KV, then hidden, each with its
    prefix: hidden, 32 tokens cached. apt with hidden priced out (30 ms a hidden step) offers KV only,
    which fits only afresh, evicting the prefix; tried only with the conversion, the idle pool would
    never admit it."""
    _, blocks, first = make_cached(model_dir, 12, scheduler="fcfs", cache_mode="hidden", ttft_slo=1.0, tbt_slo=1.0)
    executor = TokenCacheExecutor(blocks)  # one pool of token ids for both runs: the cached prefix is read back
    monkeypatch.setattr(test_scheduler, "TokenCacheExecutor", lambda _blocks: executor)
    prompt = list(range(100, 133))  # 33 tokens: four full hidden blocks of 8 published
    assert run(first, blocks, [(0.0, "a", prompt, 1)]) == {"a": reference(prompt, 1)}
    config = EngineConfig(model=model_dir, block_size=4, scheduler=policy, cache_mode="hybrid", ttft_slo=1.0,
                          tbt_slo=1.0)
    sched = make_scheduler(config, blocks)
    if policy == "apt":
        _per_step_hidden_cost(sched, 30e-3)
    follow = prompt + [7] * 7
    evicted = blocks.evictions
    assert run(sched, blocks, [(1.0, "b", follow, 2)]) == {"b": reference(follow, 2)}
    # fcfs shares the hidden prefix (a hit, no conversion); apt starts KV afresh, evicting it
    assert sched.stats["prefix_hit_tokens"] == hit and not sched.stats["prefix_conversions"]
    if policy == "apt":
        assert sched.stats["admitted_kv"] == 1 and not sched.stats["stall_guard_admissions"]
        assert blocks.evictions > evicted
