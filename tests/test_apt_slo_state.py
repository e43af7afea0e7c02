"""apt's per-request SLO memory (torch-free): lost requests, expected decode length, and their use."""
from types import SimpleNamespace

import numpy as np

from aptray.cache.block_manager import BlockManager
from aptray.plan import StepResult
from aptray.request import Request, RequestStatus
from aptray.sampling_params import SamplingParams
from aptray.scheduler.apt import AptScheduler
from aptray.scheduler.apt.features import pending_and_violators
from aptray.scheduler.apt.slo_state import PRIOR_OUTPUT_TOKENS, SloState


def request(rid, prompt_len=4, max_tokens=10, arrival=0.0, ttft=1.0, tbt=1.0):
    return Request(rid, list(range(4, 4 + prompt_len)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival, ttft, tbt)


def expected_remaining(state, req) -> int:
    made = len(req.output_token_ids)
    return int(state.expected_remaining_of(np.array([made]), np.array([req.sampling.max_tokens - made]))[0])


def test_late_first_token_or_slow_gaps_make_a_request_lost():
    state = SloState()
    late = request("late", ttft=0.5)
    late.record_token(5, 0.6)
    state.on_token(late)
    assert "late" in state.lost
    slow = request("slow", max_tokens=3)  # 2 gaps: lost for certain once both are slow
    for t, lost in ((0.1, False), (1.5, False), (3.0, True)):
        slow.record_token(5, t)
        state.on_token(slow)
        assert ("slow" in state.lost) == lost
    waiting = request("w", arrival=0.0, ttft=0.5)  # no token yet: a violator once past its TTFT SLO
    assert pending_and_violators([waiting], 0.6, state.lost)[1][0]
    assert not pending_and_violators([waiting], 0.4, state.lost)[1][0]


def test_expected_remaining_follows_finished_lengths_and_max_tokens():
    state = SloState()
    r = request("r", max_tokens=1000)
    assert expected_remaining(state, r) == PRIOR_OUTPUT_TOKENS
    for i in range(200):
        done = request(f"d{i}", max_tokens=20)
        done.output_token_ids = [5] * 20
        done.status = RequestStatus.FINISHED_LENGTH
        state.on_finish(done)
    assert 20 <= state.mean_output < 25
    assert expected_remaining(state, request("short", max_tokens=3)) == 3
    made = request("made", max_tokens=1000)
    made.output_token_ids = [5] * 500  # past the mean: a share of the mean is still expected
    assert 0 < expected_remaining(state, made) < state.mean_output


def config(**kw):
    base = dict(cache_mode="kv", iteration_shape="mixed", max_num_batched_tokens=64, max_num_seqs=8,
                enable_chunked_prefill=False, ttft_slo=1.0, tbt_slo=1.0, spec=SimpleNamespace(max_model_len=64))
    return SimpleNamespace(**{**base, **kw})


def test_lost_request_is_preempted_before_an_attainable_one():
    # 3 blocks of 4 tokens; two requests of 4 prompt tokens each need 2 blocks to decode: one must go.
    sched = AptScheduler(config(), BlockManager(3, 4))
    # max_tokens 8: 12 tokens fill the 3-block pool, so each could finish alone
    a = request("a", max_tokens=8, ttft=0.5)  # first in line, but its first token will come too late
    b = request("b", max_tokens=8, ttft=5.0)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule(0.0)
    assert {s.request_id for s in plan.seqs} == {"a", "b"}
    sched.update(plan, StepResult({"a": 5, "b": 5}, 0.01), 1.0)
    plan = sched.schedule(1.05)
    assert [s.request_id for s in plan.seqs] == ["b"]
    assert a in sched.waiting and sched.stats["preemptions"] == 1


def test_mixed_is_the_default_iteration_shape():
    from dataclasses import fields

    from aptray.config import EngineConfig
    assert {f.name: f.default for f in fields(EngineConfig)}["iteration_shape"] == "mixed"
