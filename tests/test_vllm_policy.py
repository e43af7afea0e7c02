"""The vllm policy, rule by rule against vLLM V1's Scheduler.schedule (docs/SCHEDULER.md): one token
budget for decodes and prefill chunks, running requests first, the newest preempted by recompute and
no admission in that step, max_num_seqs, first-come-first-served admission. Torch-free."""
import json

import pytest

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.plan import StepResult
from aptray.request import CacheKind, Request, RequestStatus
from aptray.sampling_params import SamplingParams
from aptray.scheduler import make_scheduler
from aptray.scheduler.vllm import VllmScheduler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt-config")
    cfg = dict(model_type="opt", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=256,
               vocab_size=1000, max_position_embeddings=512, word_embed_proj_dim=64)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def vllm(model_dir, num_blocks=64, **kw):
    config = EngineConfig(model=model_dir, scheduler="vllm", block_size=4, **kw)
    sched = make_scheduler(config, BlockManager(num_blocks, 4))
    assert isinstance(sched, VllmScheduler)
    return sched


def add(sched, rid, prompt_len, max_tokens=12, t=0.0):
    sched.add(Request(rid, [5] * prompt_len, SamplingParams(max_tokens=max_tokens), t, 1.0, 1.0))


def step(sched, now=0.0):
    """Schedule and run one step (every sampled row gets token 7); returns {request id: tokens planned}."""
    plan = sched.schedule(now)
    sched.update(plan, StepResult({s.request_id: 7 for s in plan.seqs if s.sample}, 1e-3), now)
    sched.blocks.check()
    return {s.request_id: len(s.token_ids) for s in plan.seqs}


def test_decodes_and_a_prefill_chunk_share_one_token_budget(model_dir):
    sched = vllm(model_dir, max_num_batched_tokens=16)
    add(sched, "a", 6)
    add(sched, "b", 6)
    assert step(sched) == {"a": 6, "b": 6}
    add(sched, "c", 40)
    # the two decodes first (1 token each), then c's first chunk in what is left of 16
    assert step(sched) == {"a": 1, "b": 1, "c": 14}
    # c is running mid-prefill: it continues in running-set order, after the decodes
    assert step(sched) == {"a": 1, "b": 1, "c": 14}
    assert step(sched) == {"a": 1, "b": 1, "c": 12}
    assert step(sched) == {"a": 1, "b": 1, "c": 1}


def test_a_long_prompt_alone_is_chunked_to_the_budget(model_dir):
    sched = vllm(model_dir, max_num_batched_tokens=16)
    add(sched, "long", 40)
    assert [step(sched) for _ in range(4)] == [{"long": 16}, {"long": 16}, {"long": 8}, {"long": 1}]


def test_the_budget_runs_out_on_running_requests_before_the_queue(model_dir):
    sched = vllm(model_dir, max_num_batched_tokens=8)
    add(sched, "p", 30)
    add(sched, "q", 3)
    assert step(sched) == {"p": 8}  # q waits: the budget went to p
    assert step(sched) == {"p": 8}  # p is running: it comes first again
    assert "q" in [r.request_id for r in sched.waiting]


def test_newest_running_request_is_preempted_by_recompute_and_nothing_is_admitted(model_dir):
    sched = vllm(model_dir, num_blocks=6, max_num_batched_tokens=64)  # blocks of 4 tokens
    add(sched, "a", 6)
    add(sched, "b", 6)
    assert step(sched) == {"a": 6, "b": 6}
    add(sched, "c", 3)
    assert step(sched) == {"a": 1, "b": 1, "c": 3}
    assert sched.blocks.num_free == 1
    assert step(sched) == {"a": 1, "b": 1, "c": 1}
    # a and b (9 tokens) need a third block each, one is free: a takes it, then c (the newest) is
    # preempted for b; d is not admitted in a step that preempted
    add(sched, "d", 2)
    assert step(sched) == {"a": 1, "b": 1}
    c = sched.requests["c"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["c", "d"]  # the victim goes to the front of the queue
    assert sched.stats["preemptions"] == 1


def test_a_request_that_fits_only_by_preempting_itself_waits(model_dir):
    sched = vllm(model_dir, num_blocks=4, max_num_batched_tokens=64)
    add(sched, "a", 6, max_tokens=2)
    add(sched, "b", 8, max_tokens=4)
    assert step(sched) == {"a": 6, "b": 8}
    # a decodes in its blocks; b (the newest) needs a third block and none is free: b is the victim
    assert step(sched) == {"a": 1}
    assert [r.request_id for r in sched.waiting] == ["b"] and sched.stats["preemptions"] == 1


def test_max_num_seqs_caps_the_running_set(model_dir):
    sched = vllm(model_dir, max_num_seqs=2)
    for i in range(4):
        add(sched, f"r{i}", 4)
    assert step(sched) == {"r0": 4, "r1": 4}
    assert step(sched) == {"r0": 1, "r1": 1}


def test_admission_is_first_come_first_served(model_dir):
    # the head of the queue does not fit what is free: nothing behind it is admitted either
    sched = vllm(model_dir, num_blocks=5, max_num_batched_tokens=64)
    add(sched, "a", 8, max_tokens=4)
    assert step(sched) == {"a": 8}
    add(sched, "big", 12, max_tokens=4, t=1.0)
    add(sched, "small", 2, t=2.0)
    assert step(sched) == {"a": 1}
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


def test_kv_only(model_dir):
    with pytest.raises(ValueError, match="K and V only"):
        EngineConfig(model=model_dir, scheduler="vllm", cache_mode="hybrid", block_size=4)
    config = EngineConfig(model=model_dir, scheduler="vllm", cache_mode="auto", block_size=4)
    assert config.cache_mode == "kv"
    sched = make_scheduler(config, BlockManager(32, 4))
    add(sched, "a", 9)
    step(sched)
    assert sched.requests["a"].cache_kind is CacheKind.KV
