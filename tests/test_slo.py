"""One definition of SLO attainment (aptray.slo), and everyone who judges a request agrees on it:
the server's metrics, loadgen's records, the scheduler's idea of a lost request and the
simulator's certain miss."""
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from aptray.request import Request
from aptray.sampling_params import SamplingParams
from aptray.scheduler.apt.slo_state import SloState
from aptray.serve.metrics import ServingMetrics
from aptray.sim.outcomes import certain_miss
from aptray.slo import attained, percentile, slow_gaps_to_miss, tbt_p99
from loadgen.metrics import RequestRecord


def test_percentile_is_numpys_bit_for_bit():
    rng = random.Random(0)
    for n in list(range(1, 150)) + [1000, 4000]:
        xs = [rng.random() * rng.choice([1e-4, 1.0, 1e3]) for _ in range(n)]
        for q in (50, 90, 99):
            assert percentile(xs, q) == float(np.percentile(xs, q))
    assert tbt_p99([]) == 0.0


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 300), st.data())
def test_lost_means_the_p99_must_miss(max_tokens, data):
    """However the remaining gaps turn out, slow_gaps_to_miss slow gaps put the P99 over the SLO."""
    n = max_tokens - 1
    slow = slow_gaps_to_miss(n)
    assert slow <= n
    fast = data.draw(st.lists(st.floats(0, 1), min_size=n - slow, max_size=n - slow))
    assert tbt_p99(fast + [1.0 + 1e-6] * slow) > 1.0


def _request(max_tokens, ttft_slo, tbt_slo) -> Request:
    return Request("r", [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0, ttft_slo, tbt_slo)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 120), st.floats(0.01, 2.0), st.floats(0.01, 0.5), st.data())
def test_server_loadgen_scheduler_and_simulator_agree(max_tokens, ttft_slo, tbt_slo, data):
    """A finished request with these token times: the server's counter and loadgen's record say the
    same; if the scheduler called it lost, or the simulator a certain miss, it did miss."""
    ttft = data.draw(st.floats(0.0, 3.0))
    gaps = data.draw(st.lists(st.floats(0.0, 1.0), min_size=max_tokens - 1, max_size=max_tokens - 1))
    times = [float(t) for t in np.cumsum([ttft] + gaps)]
    gaps = [b - a for a, b in zip(times, times[1:])]  # as every judge sees them: from the token times
    verdict = attained(times[0], gaps, ttft_slo, tbt_slo)

    server = ServingMetrics().observe_finished(0.0, times, ttft_slo, tbt_slo, "length")
    record = RequestRecord.from_token_times("r", 0.0, 3, max_tokens, ttft_slo, tbt_slo, times).attained
    assert server == record == verdict

    req, state, ever_lost, ever_certain = _request(max_tokens, ttft_slo, tbt_slo), SloState(), False, False
    for t in times:
        req.record_token(5, float(t))
        state.on_token(req)
        ever_lost |= "r" in state.lost
        ever_certain |= certain_miss(req, float(t))
    assert not (verdict and (ever_lost or ever_certain))


@pytest.mark.parametrize("reason", ["abort", "error", "rejected"])
def test_an_unfinished_request_is_a_miss_everywhere(reason):
    assert not ServingMetrics().observe_finished(0.0, [0.1, 0.2], 1.0, 1.0, reason)
    assert not RequestRecord.from_token_times("r", 0.0, 3, 2, 1.0, 1.0, [0.1, 0.2], status="failed").attained


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 2.0), st.floats(0.01, 0.5), st.integers(0, 4), st.floats(0.0, 3.0)),
                min_size=1, max_size=12), st.floats(0.0, 6.0))
def test_the_router_and_apt_call_the_same_requests_past_their_slo(specs, now):
    """The load snapshot's scalar rule (ttft_estimate.past_slo) and apt's vectorised one
    (features.pending_and_violators) judge every request alike: TTFT before its first token, TBT
    since its last one after."""
    from aptray.scheduler.apt.features import pending_and_violators
    from aptray.serve.ttft_estimate import past_slo
    reqs = []
    for i, (ttft_slo, tbt_slo, tokens, gap) in enumerate(specs):
        req = Request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=8), 0.0, ttft_slo, tbt_slo)
        for k in range(tokens):
            req.record_token(5, gap * (k + 1))
        reqs.append(req)
    _, violators = pending_and_violators(reqs, now)
    assert violators.tolist() == [past_slo(r, now) for r in reqs]
