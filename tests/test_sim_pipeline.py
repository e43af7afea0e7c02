"""Pipeline parallelism in aptray.sim: stage memory, send/recv pricing, the stage timeline and its
bubbles, the shared block pool, and whole runs through several micro-batch schedulers."""
import os

import numpy as np
import pytest

from aptray.cache.block_views import SharedBlockPool
from aptray.config import EngineConfig, ModelSpec
from aptray.request import CacheKind
from aptray.sim import configs_dir
from aptray.sim.cost_model import StageWork
from aptray.sim.gpus import GPUS
from aptray.sim.memory import block_bytes, plan_memory, stage_memory, weight_bytes
from aptray.sim.pipeline import PipelineTimeline
from aptray.sim.outcomes import SimRequest
from aptray.sim.runner import simulate


def model(name):
    return os.path.join(configs_dir(), name)


def spec(name):
    return ModelSpec.from_path(model(name))


def trace(n=60, seed=0, rate=3.0, prompt=(16, 900), output=(2, 300)):
    from loadgen.arrivals import arrival_times
    rng = np.random.default_rng(seed)
    times = arrival_times(rate, 1.0, n, seed)
    return [SimRequest(f"r{i}", float(t), int(rng.integers(*prompt)), int(rng.integers(*output)), 0.5, 0.2)
            for i, t in enumerate(times)]


# -- configuration and memory ---------------------------------------------------------------------
def test_hidden_ratio_stays_half_under_pipeline_stages():
    s = spec("opt-66b")
    assert [s.hidden_ratio(1, pp) for pp in (1, 2, 4)] == [0.5] * 3
    assert s.hidden_ratio(2, 2) == 1.0 and s.hidden_ratio(4, 1) == 2.0  # tp within a stage still replicates d
    assert s.layers_of_stages(4) == [16] * 4 and sum(spec("opt-13b").layers_of_stages(3)) == 40
    assert spec("opt-13b").layers_of_stages(3) == [13, 13, 14]  # the remainder on the last stage
    pp4 = EngineConfig(model=model("opt-66b"), cache_mode="hybrid", pipeline_parallel_size=4)
    assert pp4.cache_mode == "hybrid" and pp4.hidden_block_size == 2 * pp4.block_size
    tp2pp2 = EngineConfig(model=model("opt-66b"), cache_mode="auto", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert tp2pp2.cache_mode == "kv"  # r = 1 per rank: the engine turns hidden off
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig(model=model("opt-13b"), pipeline_parallel_size=0)


def test_stage_memory_holds_its_layers_and_its_own_pool():
    s, gpu = spec("opt-66b"), GPUS["a100-80gb"]
    plans = stage_memory(s, gpu, 1, 4)
    assert [p.num_layers for p in plans] == [16] * 4 and [p.stage for p in plans] == [0, 1, 2, 3]
    for p in plans:
        assert p.weights + p.activations + p.overhead + p.cache == p.usable
        assert p.block_bytes == block_bytes(s, 1, 16, 16) == 16 * 2 * 9216 * 2 * 16
        assert p.num_blocks == p.cache // p.block_bytes
    vocab = 2 * s.vocab_size * s.hidden_size
    # the first stage holds the embeddings, the last its own copy of the tied LM head; the middle ones neither
    assert plans[0].weights - plans[1].weights == vocab + 2 * s.max_model_len * s.hidden_size
    assert plans[3].weights - plans[1].weights == vocab
    assert sum(weight_bytes(s, 1, 4, i) for i in range(4)) == weight_bytes(s, 1) + vocab
    assert plans[3].activations > plans[1].activations  # the logits live on the last stage
    assert plan_memory(s, gpu, 1, pp=4).num_blocks == min(p.num_blocks for p in plans)
    # pp = 1 is the plan of before: one stage, all layers
    one = plan_memory(s, gpu, 4)
    assert (one.stage, one.num_layers, one.weights) == (0, 64, weight_bytes(s, 4))
    # a stage of 16 full-width layers holds about what a TP-4 rank of 64 quarter-width layers does
    assert 0.9 < plans[1].num_blocks / one.num_blocks < 1.1
    with pytest.raises(ValueError, match="stage 0 of 2"):
        stage_memory(s, GPUS["a100-40gb"], 1, 2)


# -- send/recv ------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["a100", "h100"])
def test_send_recv_law_is_fitted_and_monotone_in_bytes(profile):
    from aptray.sim.fit import fit_profile
    fit = fit_profile(profile, f"{profile}_dgx")
    assert fit.errors["send_recv"].n > 900 and fit.errors["send_recv"].mean < 0.15
    sizes = [0, 1, 2048, 9216, 100 * 9216, 2048 * 9216, 1 << 26]
    times = [fit.send_recv_time(n) for n in sizes]
    assert times[0] == 0.0 and all(a < b for a, b in zip(times, times[1:]))
    assert 2e-6 < times[2] < 3e-5  # a few microseconds of latency over NVLink
    assert 100e9 < fit.send_recv.byte_rate < 2e12  # hundreds of GB/s


def test_stage_boundary_transfer_grows_with_the_step_tokens():
    from aptray.plan import BatchPlan, SeqPlan
    from aptray.sim.pipeline_runner import build_pipeline
    config = EngineConfig(model=model("opt-66b"), pipeline_parallel_size=4)
    _, executor, _, _ = build_pipeline(config, "a100-80gb")
    xfer = [executor.price(BatchPlan(1, (SeqPlan("a", (5,) * n, 0, "kv", (), True),)))[1] for n in (1, 64, 512, 2048)]
    assert all(a < b for a, b in zip(xfer, xfer[1:]))
    hw = executor.cost_model.hw
    assert xfer[-1] == hw.send_recv_time(2048 * 9216)  # tokens x d fp16 values cross each boundary


# -- the timeline ---------------------------------------------------------------------------------
def test_one_micro_batch_leaves_every_stage_but_one_idle():
    tl = PipelineTimeline(4)
    now = 0.0
    for _ in range(10):  # one micro-batch: its next step starts when its last one is back
        now = tl.submit(now, StageWork(0.0, [1.0] * 4, 8, 8), 0.0, 0.0)
    assert now == 40.0 and tl.stats()["bubble_share"] == pytest.approx(0.75)


def test_enough_micro_batches_fill_the_pipeline():
    tl = PipelineTimeline(4)
    ready = [0.0] * 4  # four micro-batches, each submitted again when its step is back
    for _ in range(100):
        v = int(np.argmin(ready))
        ready[v] = tl.submit(ready[v], StageWork(0.0, [1.0] * 4, 8, 8), 0.0, 0.0)
    s = tl.stats()
    # only the fill at the start and the drain at the end are idle: 3 + 2 + 1 stage-steps each, of 4 x 103
    assert s["bubble_share"] == pytest.approx(12 / (4 * 103))
    assert s["step_latency_s"] == pytest.approx(4.0, rel=0.03)  # a token per traversal of its micro-batch


def test_host_transfers_and_busy_stages_delay_a_step():
    tl = PipelineTimeline(2)
    a = tl.submit(0.0, StageWork(0.5, [2.0, 1.0], 8, 8), 0.25, 0.125)
    assert a == 0.5 + 2.0 + 0.25 + 1.0 + 0.125
    b = tl.submit(tl.host_free, StageWork(0.5, [1.0, 1.0], 8, 8), 0.25, 0.125)
    # stage 0 is busy until 2.5 and stage 1 until 3.75: the second step waits for both
    assert b == max(max(1.0, 2.5) + 1.0 + 0.25, 3.75) + 1.0 + 0.125


# -- the shared block pool ------------------------------------------------------------------------
def test_views_share_one_pool():
    pool = SharedBlockPool(10)
    a, b = pool.view(16, 32), pool.view(16, 32)
    assert a.num_blocks == b.num_blocks == 10
    a.ensure("x", CacheKind.KV, 16 * 4)
    assert (a.num_blocks, b.num_blocks, a.num_free, b.num_free) == (10, 6, 6, 6)
    b.ensure("y", CacheKind.HIDDEN, 32 * 3)
    assert (a.num_blocks, b.num_blocks) == (7, 6)
    old, new = a.convert("x", CacheKind.HIDDEN, 16 * 4)  # 4 KV blocks -> 2 hidden ones
    assert len(new) == 2 and (a.num_blocks, b.num_blocks) == (7, 8)
    with b.whole_pool():
        assert b.num_blocks == 10  # admission asks whether a request could ever fit the pool
    pool.check()
    a.check()
    a.free("x")
    b.free("y")
    assert a.num_blocks == b.num_blocks == 10 and len(pool.free) == 10
    pool.check()


# -- whole runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,kw", [("fcfs", {}), ("apt", {"cache_mode": "hybrid"})])
def test_pipeline_loop_at_one_stage_reproduces_the_plain_loop(policy, kw):
    from aptray.sim.pipeline_runner import simulate_pipeline
    reqs = trace(40, seed=4, rate=8.0)
    # the pipeline's block views keep no prefix cache: the plain loop without one is its equal
    config = dict(model=model("opt-13b"), scheduler=policy, num_cache_blocks=300, enable_prefix_caching=False, **kw)
    plain = simulate(EngineConfig(**config), reqs)
    piped = simulate_pipeline(EngineConfig(**config), reqs)
    assert plain.pipeline is None and piped.pipeline["stages"] == 1
    assert [o.status for o in plain.outcomes] == [o.status for o in piped.outcomes]
    for a, b in zip(plain.outcomes, piped.outcomes):
        assert a.token_times == pytest.approx(b.token_times, rel=1e-9)
    assert plain.steps == piped.steps


@pytest.mark.parametrize("tp,pp,policy,kw", [(1, 4, "fcfs", {}), (1, 4, "apt", {"cache_mode": "hybrid"}),
                                             (2, 2, "sarathi", {"enable_chunked_prefill": True})])
def test_pipeline_run_conserves_requests_and_tokens(tp, pp, policy, kw):
    reqs = trace(50, seed=1, rate=6.0)
    config = EngineConfig(model=model("opt-66b"), scheduler=policy, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                          **kw)
    run = simulate(config, reqs, "a100-80gb")
    assert [o.request_id for o in run.outcomes] == [r.request_id for r in reqs]
    for o, r in zip(run.outcomes, reqs):
        assert o.status == "finished" and len(o.token_times) == r.output_len
        assert o.token_times[0] > r.arrival_time and all(x < y for x, y in zip(o.token_times, o.token_times[1:]))
    p = run.pipeline
    assert p["stages"] == pp and p["steps"] == run.steps and len(p["blocks_per_stage"]) == pp
    assert run.num_blocks == min(p["blocks_per_stage"])
    assert 0.0 <= p["bubble_share"] < 1.0 and p["step_latency_s"] >= p["step_alone_s"] > 0
    assert run.scheduler_stats.get("allocation_misses", 0) == 0  # each scheduler's view of the pool held


def test_a_request_alone_sees_the_bubble_and_a_crowd_fills_it():
    config = dict(model=model("opt-66b"), scheduler="fcfs", pipeline_parallel_size=4)
    alone = simulate(EngineConfig(**config), [SimRequest("a", 0.0, 200, 50)], "a100-80gb")
    crowd = simulate(EngineConfig(**config), [SimRequest(f"r{i}", 0.0, 200, 50) for i in range(16)], "a100-80gb")
    assert alone.pipeline["bubble_share"] > 0.72  # 3 of 4 stages idle, less the host's and the transfers' share
    assert crowd.pipeline["bubble_share"] < 0.12  # four micro-batches of four: only fill, drain, uneven stages
    # one token per traversal: a lone request's gap is every stage's time, not one stage's
    gaps = np.diff(alone.outcomes[0].token_times)
    stage = alone.pipeline["stage_busy_s"][1] / alone.pipeline["steps"]
    assert np.median(gaps) > 3.9 * stage


def test_micro_batches_share_the_block_budget():
    """Requests of more than half the pool each: a fixed split per micro-batch (vLLM 0.5) would refuse
    them all; over one shared pool they all finish, taking blocks the other micro-batch freed."""
    from aptray.sim.pipeline_runner import simulate_pipeline
    reqs = [SimRequest(f"r{i}", 0.01 * i, 1200, 100) for i in range(6)]  # 82 blocks each of 120
    config = EngineConfig(model=model("opt-13b"), scheduler="fcfs", pipeline_parallel_size=2, num_cache_blocks=120)
    run = simulate_pipeline(config, reqs, "a100-80gb")
    assert [o.status for o in run.outcomes] == ["finished"] * 6
    assert [len(o.token_times) for o in run.outcomes] == [100] * 6


# -- configuration surfaces -------------------------------------------------------------------------
def test_cli_pp_reaches_the_config_and_only_the_simulator():
    from loadgen.arguments import build_parser
    from loadgen.run_setup import config_factory, make_client
    args = build_parser().parse_args(["sweep", "--sim", "--model", "opt-66b", "--pp", "4"])
    config = config_factory(args, "apt")()
    assert (config.pipeline_parallel_size, config.tensor_parallel_size, config.cache_mode) == (4, 1, "hybrid")
    assert build_parser().parse_args(["run", "--sim"]).pp == 1
    real = build_parser().parse_args(["run", "--model", model("opt-13b"), "--pp", "2"])
    with pytest.raises(SystemExit, match="simulated only"):
        make_client(real, "fcfs")


def test_the_serving_engine_refuses_pipeline_stages():
    from aptray.llm import LLM
    with pytest.raises(ValueError, match="simulated only"):
        LLM(model=model("opt-13b"), pipeline_parallel_size=2)


def test_decision_rule_of_the_pipeline_comparison():
    from loadgen.results_pp import GROUPS, decision, is_burst, setup_of
    g = next(x for x in GROUPS if x.model == "opt-30b")  # layouts TP2 KV, PP2 hybrid, PP2 KV

    def data(pp_hybrid_over_tp: dict) -> dict:
        res = []
        for ds, gain in pp_hybrid_over_tp.items():
            for lay, eff in ((g.layouts[0], 1.0), (g.layouts[1], gain), (g.layouts[2], 9.0)):
                for p in lay.policies:  # PP KV is fast, but only the hybrid pipeline counts
                    res.append({"setup": setup_of(g, lay, ds).name, "policy": p, "effective_throughput_rps": eff,
                                "probes": {str(eff): {"attainment": 1.0, "goodput_rps": 0.9 * eff}}})
        return {"results": res}
    two = decision(data({"sharegpt": 1.2, "humaneval": 1.15, "synthetic-longprompt": 0.5}), [g])
    one = decision(data({"sharegpt": 1.2, "humaneval": 1.1, "synthetic-longprompt": 1.1}), [g])
    long_short = decision(data({"sharegpt": 0.5, "humaneval": 0.5, "synthetic-longprompt": 1.2}), [g])
    long_alone = decision(data({"sharegpt": 0.5, "humaneval": 0.5, "synthetic-longprompt": 1.3}), [g])
    assert "**opt-30b on 2 x a100-40gb: wins** (2 of 3" in two[0]
    assert "does not win** (1 of 3" in one[0]
    assert "does not win** (1 of 3" in long_short[0]  # long prompts alone must win by more than 15%
    assert ": wins** (1 of 3" in long_alone[0]
    steady = {"effective_throughput_rps": 2.0, "probes": {"2.0": {"attainment": 0.95, "goodput_rps": 1.7}}}
    burst = {"effective_throughput_rps": 300.0, "probes": {"300.0": {"attainment": 0.91, "goodput_rps": 6.0}}}
    assert not is_burst(steady) and is_burst(burst)


def test_pipeline_replays_conversations_as_a_closed_loop():
    """A follow-up turn comes think_time after the turn it follows ends, not at its placeholder time."""
    from aptray.sim.pipeline_runner import simulate_pipeline
    reqs = []
    for c in range(6):
        after = None
        for k in range(3):
            reqs.append(SimRequest(f"c{c}-t{k}", 0.2 * c, 100 + 70 * k, 20, content_key=f"conv-{c}", after=after,
                                   think_time=0.5))
            after = f"c{c}-t{k}"
    run = simulate_pipeline(EngineConfig(model=model("opt-13b"), scheduler="fcfs", pipeline_parallel_size=2), reqs)
    by = {o.request_id: o for o in run.outcomes}
    assert [o.status for o in run.outcomes] == ["finished"] * len(reqs)
    for r in reqs:
        if r.after is not None:
            assert by[r.request_id].arrival_time >= by[r.after].token_times[-1] + 0.5 - 1e-9
            assert by[r.request_id].token_times[0] > by[r.request_id].arrival_time


def test_the_pipeline_results_part_runs_end_to_end():
    """`python -m loadgen results --parts pp` in small: one group, one dataset, a few requests. Each
    layout's policies give an effective throughput, and the page's section renders from the result."""
    from loadgen.results_pp import DATASETS, GROUPS, jobs, markdown, run
    group, dataset = GROUPS[0], next(iter(DATASETS))
    data = run(groups=(group,), datasets=(dataset,), num_requests=12, workers=1, rel_tol=0.5, log=lambda _: None)
    assert len(data["results"]) == len(jobs((group,), (dataset,), 12, 1.0, 0.5)) > 0
    assert all(r["effective_throughput_rps"] > 0 for r in data["results"])
    assert set(data["decode_steps"]) and "|" in "\n".join(markdown(data, (group,)))
