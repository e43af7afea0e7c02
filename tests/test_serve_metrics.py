"""ServingMetrics without Ray: SLO accounting, counter deltas, exposition text."""
from collections import Counter
from types import SimpleNamespace

from aptray.cache.block_manager import BlockManager
from aptray.request import CacheKind
from aptray.serve.metrics import ServingMetrics
from aptray.slo import attained as slo_attained
from aptray.slo import tbt_p99 as p99


def _sample(m, name, labels=None):
    return m.registry.get_sample_value(name, labels or {})


def test_slo_rule():
    assert slo_attained(0.2, [0.05] * 200, 0.25, 0.1)
    assert not slo_attained(0.3, [], 0.25, 0.1)
    assert not slo_attained(0.2, [0.05] * 98 + [0.5, 0.5], 0.25, 0.1)  # p99 of 100 gaps is the 99th
    assert slo_attained(0.2, [0.05] * 99 + [0.5], 0.25, 0.1)
    assert p99([]) == 0.0 and not slo_attained(None, [], 1, 1)


def test_finished_requests_feed_histograms_and_slo_counters():
    m = ServingMetrics()
    assert m.observe_finished(10.0, [10.1, 10.15, 10.2], 0.5, 0.1, "length")
    assert not m.observe_finished(10.0, [11.0, 11.05], 0.5, 0.1, "stop")
    assert not m.observe_finished(10.0, [10.1], 0.5, 0.1, "abort")
    m.observe_rejected("queue_full")
    assert _sample(m, "aptray_ttft_seconds_count") == 3
    assert _sample(m, "aptray_tbt_seconds_count") == 3
    assert _sample(m, "aptray_slo_attained_total") == 1
    assert _sample(m, "aptray_slo_missed_total", {"reason": "ttft"}) == 1
    assert _sample(m, "aptray_slo_missed_total", {"reason": "abort"}) == 1
    assert _sample(m, "aptray_slo_missed_total", {"reason": "rejected"}) == 1
    assert _sample(m, "aptray_requests_rejected_total", {"reason": "queue_full"}) == 1


def test_iteration_exports_blocks_and_counter_deltas():
    m = ServingMetrics()
    blocks = BlockManager(10, 4, 8)
    blocks.ensure("a", CacheKind.KV, 8)  # 2 blocks
    blocks.ensure("b", CacheKind.HIDDEN, 8)  # 1 block
    sched = SimpleNamespace(waiting=[1, 2, 3], running=[1], blocks=blocks, alpha=0.002,
                            stats=Counter(preemptions=2, conversions_to_kv=1, prefix_queried_tokens=40,
                                          prefix_hit_tokens=16, prefix_queried_blocks=9, prefix_hit_blocks=4))
    m.observe_iteration(sched, 1e-4, 0.01)
    sched.stats["preemptions"] += 1
    sched.stats["prefix_hit_tokens"] += 8
    m.observe_iteration(sched, 2e-4, 0.02)
    assert _sample(m, "aptray_prefix_cache_queried_tokens_total") == 40
    assert _sample(m, "aptray_prefix_cache_hit_tokens_total") == 24
    assert _sample(m, "aptray_prefix_cache_hit_blocks_total") == 4
    assert _sample(m, "aptray_prefix_cache_queried_blocks_total") == 9
    assert _sample(m, "aptray_cache_blocks_cached") == 0
    assert _sample(m, "aptray_requests_waiting") == 3
    assert _sample(m, "aptray_cache_blocks_in_use", {"kind": "kv"}) == 2
    assert _sample(m, "aptray_cache_blocks_in_use", {"kind": "hidden"}) == 1
    assert _sample(m, "aptray_preemptions_total") == 3
    assert _sample(m, "aptray_conversions_total", {"to_kind": "kv"}) == 1
    assert _sample(m, "aptray_alpha_seconds_per_block") == 0.002
    assert _sample(m, "aptray_scheduler_seconds_count") == 2
    assert b"aptray_ttft_seconds_bucket" in m.text()
