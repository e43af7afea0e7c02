"""Every policy finishes every request it accepted, with the reference tokens, on random small pools.

Random workloads (shared system prompts, follow-up turns that resend a conversation, prompts that fit
the pool only as hidden) on pools of 8-40 blocks, every policy and cache mode, prefix caching on or
off, and step times that the cost models learn from, with noise up to 30x either way (the engine
times real steps: a noisy machine feeds apt and sarathi such steps). Without the rules of
docs/SCHEDULER.md ("Progress"), seeds 71, 208 and 562 wait for ever (a prompt that fits only as
hidden, admitted chunk by chunk as KV), and so does 4619 (a partial prefill waiting for blocks that
each new admission takes). The token-id executor of test_scheduler checks every block table.
"""
from __future__ import annotations

import random

import pytest

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.request import CacheKind
from aptray.scheduler import make_scheduler
from test_scheduler import POLICIES, TokenCacheExecutor, model_dir, reference, run  # noqa: F401 (model_dir: a fixture)

import test_scheduler

FOUND = (71, 208, 562, 4619)
SEEDS = sorted(set(FOUND) | set(range(200)))


class NoisyStepTimes(TokenCacheExecutor):
    """TokenCacheExecutor whose step times are off by up to 10**noise either way."""

    def __init__(self, blocks, rng: random.Random, noise: float, **cost):
        super().__init__(blocks, **cost)
        self.rng, self.noise = rng, noise

    def execute(self, plan):
        result = super().execute(plan)
        result.step_time *= 10 ** self.rng.uniform(-self.noise, self.noise)
        return result


def random_case(model_dir, seed: int):
    """(scheduler, blocks, executor, workload) of one seed."""
    rng = random.Random(seed)
    policy, extra = rng.choice(POLICIES)
    mode = "kv" if policy == "vllm" else rng.choice(["kv", "hidden", "hybrid"])
    caching = rng.random() < 0.6
    num_blocks = rng.randint(8, 40)
    c_hid = 10 ** rng.uniform(-5, -1.5)
    noise = rng.choice([0, 0.5, 1.5])
    config = EngineConfig(model=model_dir, block_size=4, scheduler=policy, cache_mode=mode,
                          ttft_slo=rng.choice([0.05, 0.2, 1.0]), tbt_slo=rng.choice([0.01, 0.05, 0.2]), **extra)
    blocks = BlockManager(num_blocks, 4, config.hidden_block_size if mode != "kv" else 0, enable_caching=caching)
    executor = NoisyStepTimes(blocks, rng, noise, c_hid=c_hid)
    system = list(range(500, 500 + rng.randint(0, 30)))
    work, t = [], 0.0
    for i in range(rng.randint(1, 14)):
        t += rng.uniform(0, 0.05)
        prompt = (system if rng.random() < 0.5 else []) + [rng.randint(0, 999) for _ in range(rng.randint(1, 40))]
        if work and rng.random() < 0.3:  # a follow-up turn: an earlier prompt, its reply, a new message
            _, _, earlier, n = rng.choice(work)
            prompt = earlier + reference(earlier, n) + prompt[:5]
        work.append((t, f"r{i}", prompt[:100], rng.randint(1, 12)))
    # what the scheduler refuses at once (more than the whole pool, even as hidden) is not in the run
    smallest = CacheKind.KV if mode == "kv" else CacheKind.HIDDEN
    work = [w for w in work if blocks.blocks_for(len(w[2]) + w[3], smallest) <= num_blocks]
    return make_scheduler(config, blocks), blocks, executor, work


@pytest.mark.parametrize("seed", SEEDS)
def test_random_small_pools_finish_every_request(model_dir, seed, monkeypatch):
    sched, blocks, executor, work = random_case(model_dir, seed)
    monkeypatch.setattr(test_scheduler, "TokenCacheExecutor", lambda _blocks: executor)
    outputs = run(sched, blocks, work)
    assert {rid: outputs[rid] for _, rid, _, _ in work} == {rid: reference(p, n) for _, rid, p, n in work}
    assert not blocks.owners()
