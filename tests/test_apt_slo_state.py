"""apt's per-request SLO memory (torch-free): lost requests, expected decode length, and their use."""
from types import SimpleNamespace

from aptray.cache.block_manager import BlockManager
from aptray.plan import StepResult
from aptray.request import Request, RequestStatus
from aptray.sampling_params import SamplingParams
from aptray.scheduler.apt import AptScheduler
from aptray.scheduler.apt.slo_state import PRIOR_OUTPUT_TOKENS, SloState


def request(rid, prompt_len=4, max_tokens=10, arrival=0.0, ttft=1.0, tbt=1.0):
    return Request(rid, list(range(4, 4 + prompt_len)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival, ttft, tbt)


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
    waiting = request("w", arrival=0.0, ttft=0.5)
    assert state.is_lost(waiting, 0.6) and not state.is_lost(waiting, 0.4)


def test_expected_remaining_follows_finished_lengths_and_max_tokens():
    state = SloState()
    r = request("r", max_tokens=1000)
    assert state.expected_remaining(r) == PRIOR_OUTPUT_TOKENS
    for i in range(200):
        done = request(f"d{i}", max_tokens=20)
        done.output_token_ids = [5] * 20
        done.status = RequestStatus.FINISHED_LENGTH
        state.on_finish(done)
    assert 20 <= state.mean_output < 25
    assert state.expected_remaining(request("short", max_tokens=3)) == 3


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
