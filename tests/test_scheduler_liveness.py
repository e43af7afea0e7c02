"""Every policy finishes every request it accepted, with the reference tokens, on random small pools.

Random workloads (shared system prompts, follow-up turns that resend a conversation, prompts that fit
the pool only as hidden) on pools of 8-80 blocks, every policy and cache mode, prefix caching on or
off, and step times that the cost models learn from, with noise up to 30x either way (the engine
times real steps: a noisy machine feeds apt and sarathi such steps). Without the rules of
docs/SCHEDULER.md ("Progress"), seeds 71, 208 and 562 wait for ever (a prompt that fits only as
hidden, admitted chunk by chunk as KV), and so do 4619 (a partial prefill waiting for blocks that
each new admission takes) and, with requested upgrades, 1296 and 1301 (a hidden request moved to KV
mid-prefill, whose prompt as KV outgrows the pool). The token-id executor of test_scheduler checks
every block table. APTRAY_LIVENESS_SEEDS sets how many random workloads each test runs (default 200).
"""
from __future__ import annotations

import os
import random

import pytest

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.request import CacheKind
from aptray.scheduler import make_scheduler
from test_scheduler import POLICIES, TokenCacheExecutor, model_dir, reference, run  # noqa: F401 (model_dir: a fixture)

import test_scheduler

SEEDS = int(os.environ.get("APTRAY_LIVENESS_SEEDS", "200"))  # random workloads per test; more to search wider
SMALL = dict(requests=(1, 14), max_tokens=(1, 12), blocks=(8, 40))
LARGE = dict(requests=(5, 40), max_tokens=(1, 30), blocks=(8, 80))  # and hidden requests asked to go KV


class NoisyStepTimes(TokenCacheExecutor):
    """TokenCacheExecutor whose step times are off by up to 10**noise either way."""

    def __init__(self, blocks, rng: random.Random, noise: float, **cost):
        super().__init__(blocks, **cost)
        self.rng, self.noise = rng, noise

    def execute(self, plan):
        result = super().execute(plan)
        result.step_time *= 10 ** self.rng.uniform(-self.noise, self.noise)
        return result


def random_case(model_dir, seed: int, sizes: dict):
    """(scheduler, blocks, executor, workload, rng) of one seed."""
    rng = random.Random(seed)
    policy, extra = rng.choice(POLICIES)
    mode = "kv" if policy == "vllm" else rng.choice(["kv", "hidden", "hybrid"])
    caching = rng.random() < 0.6
    num_blocks = rng.randint(*sizes["blocks"])
    c_hid = 10 ** rng.uniform(-5, -1.5)
    noise = rng.choice([0, 0.5, 1.5])
    config = EngineConfig(model=model_dir, block_size=4, scheduler=policy, cache_mode=mode,
                          ttft_slo=rng.choice([0.05, 0.2, 1.0]), tbt_slo=rng.choice([0.01, 0.05, 0.2]), **extra)
    blocks = BlockManager(num_blocks, 4, config.hidden_block_size if mode != "kv" else 0, enable_caching=caching)
    executor = NoisyStepTimes(blocks, rng, noise, c_hid=c_hid)
    system = list(range(500, 500 + rng.randint(0, 30)))
    work, t = [], 0.0
    for i in range(rng.randint(*sizes["requests"])):
        t += rng.uniform(0, 0.05)
        prompt = (system if rng.random() < 0.5 else []) + [rng.randint(0, 999) for _ in range(rng.randint(1, 40))]
        if work and rng.random() < 0.3:  # a follow-up turn: an earlier prompt, its reply, a new message
            _, _, earlier, n = rng.choice(work)
            prompt = earlier + reference(earlier, n) + prompt[:5]
        work.append((t, f"r{i}", prompt[:100], rng.randint(*sizes["max_tokens"])))
    # what the scheduler refuses at once (more than the whole pool, even as hidden) is not in the run
    smallest = CacheKind.KV if mode == "kv" else CacheKind.HIDDEN
    work = [w for w in work if blocks.blocks_for(len(w[2]) + w[3], smallest) <= num_blocks]
    return make_scheduler(config, blocks), blocks, executor, work, rng


def finish_all(sched, blocks, executor, work, monkeypatch):
    monkeypatch.setattr(test_scheduler, "TokenCacheExecutor", lambda _blocks: executor)
    outputs = run(sched, blocks, work)
    assert {rid: outputs[rid] for _, rid, _, _ in work} == {rid: reference(p, n) for _, rid, p, n in work}
    assert not blocks.owners()


@pytest.mark.parametrize("seed", sorted({71, 208, 562, 4619} | set(range(SEEDS))))
def test_random_small_pools_finish_every_request(model_dir, seed, monkeypatch):
    sched, blocks, executor, work, _ = random_case(model_dir, seed, SMALL)
    finish_all(sched, blocks, executor, work, monkeypatch)


@pytest.mark.parametrize("seed", sorted({1296, 1301} | set(range(SEEDS))))
def test_random_loads_with_requested_upgrades_finish_every_request(model_dir, seed, monkeypatch):
    """Longer queues, and now and then hidden requests asked to move to KV (Scheduler.request_upgrade,
    as the GPU check asks them), some mid-prefill."""
    sched, blocks, executor, work, rng = random_case(model_dir, seed, LARGE)
    schedule = sched.schedule

    def with_upgrades(now):
        if rng.random() < 0.1:
            for req in list(sched.running):
                if req.cache_kind is CacheKind.HIDDEN and rng.random() < 0.5:
                    sched.request_upgrade(req.request_id)
        return schedule(now)
    sched.schedule = with_upgrades
    finish_all(sched, blocks, executor, work, monkeypatch)
