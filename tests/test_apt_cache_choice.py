"""How apt chooses between KV and hidden over a request's life (torch-free): upgrades weighed at
the request's expected end, hidden while the pool is short or the load would not fit as KV, KV
where hidden costs more time than its memory buys, and the step-cost model's price of hidden."""
import random

import numpy as np

from aptray.cache.block_manager import BlockManager
from aptray.config import EngineConfig
from aptray.request import CacheKind, Request, RequestStatus
from aptray.sampling_params import SamplingParams
from aptray.scheduler import make_scheduler
from aptray.scheduler.apt.greedy import HIDDEN, KV, Budgets, Candidates, select
from aptray.scheduler.apt.slo_state import SloState
from test_scheduler import _synthetic_plan, model_dir, running_hidden  # noqa: F401 (model_dir: a fixture)


def _apt(model_dir, num_blocks=64):
    config = EngineConfig(model=model_dir, scheduler="apt", cache_mode="hybrid", block_size=4,
                          num_cache_blocks=num_blocks, iteration_shape="alternate")
    return make_scheduler(config, BlockManager(num_blocks, 4, config.hidden_block_size))


def _finished(prompt: int, output: int, life: float) -> Request:
    req = Request("done", [1] * prompt, SamplingParams(max_tokens=output), 0.0, 1.0, 1.0)
    req.output_token_ids = [1] * output
    req.first_token_time, req.last_token_time = 0.0, life
    req.status = RequestStatus.FINISHED_LENGTH
    return req


def test_upgrades_weigh_what_kv_holds_by_the_requests_end():
    """Two requests whose upgrade is one block now but eight by their end: with a budget of eight
    lifetime blocks one goes KV; weighed by today's size both would."""
    c = Candidates(np.array([1.0, 1.0]), np.array([2, 2]), np.array([1, 1]), np.array([0.99, 0.99]),
                   np.array([4, 4]), np.zeros(2, bool), upgrade_blocks=np.array([8, 8]))
    assert list(select(c, Budgets(8, 1000, 10, upgrade_blocks=8)).kind) == [KV, HIDDEN]
    today = Candidates(*(getattr(c, f) for f in ("value", "kv_blocks", "hidden_blocks", "hidden_value", "tokens",
                                                  "violator")))
    assert list(select(today, Budgets(8, 1000, 10, upgrade_blocks=8)).kind) == [KV, KV]


def test_after_a_shortage_a_request_runs_hidden_unless_hidden_costs_more_than_its_memory(model_dir):
    """The pool was short (and no request has finished to say how long one holds its blocks): a new
    request that would fit as KV runs as hidden, where hidden costs a sliver of a step; priced at
    a whole second of step time per block (as recompute is on long contexts), it is offered KV."""
    for alpha, kind in ((0.0, CacheKind.HIDDEN), (1.0, CacheKind.KV)):
        sched = _apt(model_dir)
        sched.forecast.short_at = 0.0
        sched.pricing.avg_per_block = alpha
        sched.add(Request("r", list(range(1, 10)), SamplingParams(max_tokens=4), 0.0, 5.0, 5.0))
        sched.schedule(0.1)
        assert [r.cache_kind for r in sched.running] == [kind]


def test_a_load_that_would_not_fit_as_kv_runs_hidden(model_dir):
    """No shortage yet, but at the recent arrival rate requests like the finished one would hold
    more tokens as KV than the pool has (mean + 2 sigma): a new request runs as hidden; at a
    hundredth of that rate it runs as KV."""
    for gap, kind in ((0.1, CacheKind.HIDDEN), (10.0, CacheKind.KV)):
        sched = _apt(model_dir)
        sched.slo.on_finish(_finished(100, 100, 2.0))
        for i in range(10):
            sched.forecast.arrivals.append(i * gap)
        sched.add(Request("r", list(range(1, 10)), SamplingParams(max_tokens=4), 10 * gap, 5.0, 5.0))
        sched.schedule(10 * gap + 0.01)
        assert [r.cache_kind for r in sched.running] == [kind]


def test_held_tokens_follow_campbells_theorem():
    slo = SloState()
    assert slo.held_tokens(1.0) is None
    slo.on_finish(_finished(100, 100, 2.0))  # holds 150 tokens on average for 2 s
    mean, std = slo.held_tokens(10.0)
    assert mean == 3000.0 and abs(std - np.sqrt(10 * 150 ** 2 * 2)) < 1e-9


def test_a_decode_upgrade_keeps_room_for_its_own_growth_as_kv(model_dir):
    """A hidden request of 41 tokens is expected to end near 168 (the prior mean output): 42 KV
    blocks. In a 40-block pool its KV form fits today (11 blocks) but not its end, so it stays
    hidden; in 64 blocks it is upgraded. Counting only today's size upgraded it in both."""
    for num_blocks, upgraded in ((40, False), (64, True)):
        sched = _apt(model_dir, num_blocks)
        running_hidden(sched, 40, max_tokens=200)
        assert bool(sched._upgrades(sched._view(0.0), 10_000)) is upgraded


def test_fit_puts_a_per_step_hidden_cost_on_its_own_feature():
    """Absorbed attention reads W_k and W_v once per step as soon as one hidden request decodes: the
    fit carries that cost in c_hany instead of on the first hidden requests' blocks."""
    from aptray.scheduler.step_cost import StepCostModel, step_features
    rng = random.Random(3)
    c0, c_tok, c_seq, c_kv, c_hid, c_hany = 1e-3, 2e-5, 5e-5, 1e-6, 1.5e-6, 2.6e-3
    model = StepCostModel(4, 8)
    for _ in range(3000):
        plan = _synthetic_plan(rng, rng.randint(1, 64), hidden_share=rng.choice([0.0, 0.05, 0.5]))
        x = step_features(plan)
        t = c0 + c_tok * x[1] + c_seq * x[2] + c_kv * x[3] + c_hid * x[4] + c_hany * x[8]
        model.observe(plan, t * (1 + 0.02 * rng.gauss(0, 1)))
    assert abs(model.hidden_step_cost - c_hany) < 0.1 * c_hany, model.coefficients()
    assert abs(model.alpha - (c_hid - 2 * c_kv)) < 0.3e-6, model.coefficients()
