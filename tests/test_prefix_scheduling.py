"""Every policy with prefix caching, on the token-id executor of test_scheduler: prompts that share
prefixes (a common system prompt, follow-up turns that resend a conversation) must give exactly the
reference tokens, with hits, under pools small enough to evict, preempt and convert; nothing leaks."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.request import CacheKind, Request, RequestStatus
from aptray.sampling_params import SamplingParams
from aptray.scheduler import make_scheduler
from test_scheduler import POLICIES, VOCAB, with_cache_modes, model_dir, reference, run  # noqa: F401 (model_dir is a fixture)

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


@pytest.mark.parametrize("policy", ["fcfs", "apt"])
def test_a_cached_hidden_prefix_too_big_to_convert_beside_its_kv_table_is_evicted_instead(model_dir, policy):
    """A KV request converting a cached hidden prefix holds the prefix's blocks beside its new table. In a
    12-block pool whose only cached blocks are a 32-token hidden prefix (4 blocks), a 40-token request
    as KV with that conversion needs 10 + 4 blocks; started afresh it needs 10. It must start afresh,
    evicting the prefix: an idle pool that never admits it is stuck for good."""
    _, blocks, first = make_cached(model_dir, 12, scheduler="fcfs", cache_mode="hidden", ttft_slo=1.0, tbt_slo=1.0)
    prompt = list(range(100, 133))  # 33 tokens: four full hidden blocks of 8 published
    assert run(first, blocks, [(0.0, "a", prompt, 1)]) == {"a": reference(prompt, 1)}
    config = EngineConfig(model=model_dir, block_size=4, scheduler=policy, cache_mode="hybrid", ttft_slo=1.0,
                          tbt_slo=1.0)
    sched = make_scheduler(config, blocks)
    req = Request("b", prompt + [7] * 7, SamplingParams(temperature=0.0, max_tokens=2), 0.0, 1.0, 1.0)
    sched.add(req)
    assert blocks.cached_prefix(req, CacheKind.KV).tokens == 32  # the conversion is on offer, and does not fit
    assert sched._take_blocks(req, CacheKind.KV, lambda: 8) == 8
    assert req.num_computed_tokens == 0 and blocks.held_by(CacheKind.KV) == 2 and blocks.evictions == 0
    assert not sched._prefix_conversions  # nothing converts: the prefix's blocks are free, to be evicted
    sched.waiting.remove(req)
    sched.finish(req, RequestStatus.FINISHED_ABORTED)
    # with room for both, the same request converts the prefix (32 tokens computed from the cache)
    _, roomy, first = make_cached(model_dir, 16, scheduler="fcfs", cache_mode="hidden", ttft_slo=1.0, tbt_slo=1.0)
    run(first, roomy, [(0.0, "a", prompt, 1)])
    sched = make_scheduler(config, roomy)
    req = Request("b", prompt + [7] * 7, SamplingParams(temperature=0.0, max_tokens=2), 0.0, 1.0, 1.0)
    sched.add(req)
    assert sched._take_blocks(req, CacheKind.KV, lambda: 8) == 8 and req.num_computed_tokens == 32
    assert len(sched._prefix_conversions) == 1
