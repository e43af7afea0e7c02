"""aptray.sim: fit to the vidur profiles, cost model physics, memory model, and end-to-end runs."""
import json
import os

import numpy as np
import pytest

from aptray.config import EngineConfig, ModelSpec
from aptray.sim import configs_dir
from aptray.sim.cost_model import CostModel, SeqWork
from aptray.sim.fit import fit_profile, hardware_for, leave_one_model_out
from aptray.sim.gpus import GPUS, GiB
from aptray.sim.memory import plan_memory, weight_bytes
from aptray.sim.profiles import DEFAULT_PROFILE_DIR


@pytest.fixture
def profiles_present():
    # the measured GPU timings are vendored with the package; missing them is a failure, not a skip
    assert os.path.isdir(DEFAULT_PROFILE_DIR), \
        f"vidur profiles not found at {DEFAULT_PROFILE_DIR}"


needs_profiles = pytest.mark.usefixtures("profiles_present")


def spec(name):
    return ModelSpec.from_path(os.path.join(configs_dir(), name))


# Stated fit errors (mean |pred/measured - 1| over every profile row); docs/SIMULATOR.md reports them.
GEMM_MEAN_ERROR = {"a100": 0.09, "h100": 0.11}


@needs_profiles
@pytest.mark.parametrize("profile", ["a100", "h100"])
def test_fit_reproduces_profile_rows(profile):
    fit = fit_profile(profile, f"{profile}_dgx")
    e = fit.errors
    assert e["gemm"].mean < GEMM_MEAN_ERROR[profile] and e["gemm"].n > 10_000
    for op in ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"):
        assert e[op].median < 0.11
    for op in ("layernorm", "activation", "residual_add"):
        assert e[op].median < 0.2
    assert e["all_reduce_tp2"].median < 0.1 and e["all_reduce_tp4"].median < 0.1
    assert 0.5 < fit.gemm.flop_rate / {"a100": 312e12, "h100": 989e12}[profile] < 1.0  # plausible MFU


@needs_profiles
def test_fit_generalises_to_unseen_shapes():
    held_out = leave_one_model_out("a100")
    assert max(err.mean for err in held_out.values()) < 0.10
    assert held_out["internlm-20b"].mean < 0.10  # d = 5120 as OPT-13B


def test_opt_weights_match_parameter_counts():
    for name, params in (("opt-13b", 12.85e9), ("opt-30b", 29.97e9), ("opt-66b", 65.7e9)):
        assert weight_bytes(spec(name), 1) / 2 == pytest.approx(params, rel=0.01)
    assert weight_bytes(spec("opt-66b"), 4) < weight_bytes(spec("opt-66b"), 1) / 3.9


def test_memory_plan_sizes_the_pool():
    p = plan_memory(spec("opt-13b"), GPUS["a100-40gb"], 1)
    assert p.weights + p.activations + p.overhead + p.cache == p.usable
    assert 8 * GiB < p.cache < 13 * GiB and p.num_blocks == p.cache // p.block_bytes
    # OPT-13B, 40 layers, 5120 wide, fp16: 16 tokens of K and V = 16 * 2 * 5120 * 2 * 40 bytes
    assert p.block_bytes == 16 * 2 * 5120 * 2 * 40
    assert plan_memory(spec("opt-66b"), GPUS["a100-40gb"], 4).num_blocks > 200
    assert plan_memory(spec("opt-13b"), GPUS["a100-80gb"], 1).num_blocks > 3 * p.num_blocks
    with pytest.raises(ValueError, match="does not fit"):
        plan_memory(spec("opt-66b"), GPUS["a100-40gb"], 1)


@needs_profiles
def test_cost_model_physics():
    hw = hardware_for(GPUS["a100-40gb"])
    s = spec("opt-13b")
    kv = CostModel(s, hw, 1, "absorbed", step_overhead=0.0)
    rec = CostModel(s, hw, 1, "recompute", step_overhead=0.0)
    one = kv.step_time([SeqWork("kv", 1, 100)])
    # a lone decode streams the weights: about weights / HBM bandwidth
    assert one == pytest.approx(weight_bytes(s, 1) / GPUS["a100-40gb"].hbm_bandwidth, rel=0.35)
    # prefill is compute-bound: about 2 * params * tokens / fitted FLOP rate
    pf = kv.step_time([SeqWork("kv", 1024, 1024)])
    assert pf == pytest.approx(2 * 12.85e9 * 1024 / hw.gemm.flop_rate, rel=0.35)
    assert kv.step_time([SeqWork("kv", 512, 512)]) < pf
    batch_kv = [SeqWork("kv", 1, 1500)] * 64
    batch_hidden = [SeqWork("hidden", 1, 1500)] * 64
    assert kv.step_time(batch_hidden) < kv.step_time(batch_kv)  # absorbed reads half the bytes
    assert rec.step_time(batch_hidden) > 3 * kv.step_time(batch_kv)  # re-projecting K,V is costly
    tp2 = CostModel(s, hw, 2, "absorbed", step_overhead=0.0)
    assert tp2.step_time(batch_kv) < kv.step_time(batch_kv)
    assert kv.step_time([]) == 0.0


def small_trace(n=60, seed=0, rate=3.0):
    from loadgen.arrivals import arrival_times
    from aptray.sim.outcomes import SimRequest
    rng = np.random.default_rng(seed)
    times = arrival_times(rate, 1.0, n, seed)
    return [SimRequest(f"r{i}", float(t), int(rng.integers(16, 900)), int(rng.integers(2, 300)), 0.5, 0.2)
            for i, t in enumerate(times)]


def sim_config(policy="fcfs", **kw):
    return EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), scheduler=policy, **kw)


@needs_profiles
def test_sim_end_to_end_fcfs_finishes_and_is_deterministic():
    from aptray.sim.runner import simulate
    reqs = small_trace()
    a = simulate(sim_config(), reqs)
    b = simulate(sim_config(), reqs)
    assert all(o.status == "finished" for o in a.outcomes) and len(a.outcomes) == len(reqs)
    for o, r in zip(a.outcomes, reqs):
        assert len(o.token_times) == r.output_len
        assert o.token_times[0] > r.arrival_time and all(np.diff(o.token_times) > 0)
    assert [o.token_times for o in a.outcomes] == [o.token_times for o in b.outcomes]
    assert a.steps == b.steps and a.sim_time == b.sim_time and a.busy_time <= a.sim_time


@needs_profiles
@pytest.mark.parametrize("policy,kw", [("sarathi", {"enable_chunked_prefill": True}), ("apt", {"cache_mode": "hybrid"})])
def test_sim_runs_other_policies(policy, kw):
    from aptray.sim.runner import simulate
    run = simulate(sim_config(policy, **kw), small_trace(40, seed=1, rate=6.0))
    assert all(o.status == "finished" for o in run.outcomes)


@needs_profiles
def test_sim_small_pool_preempts_and_still_finishes():
    from aptray.sim.runner import simulate
    run = simulate(sim_config(num_cache_blocks=150), small_trace(40, seed=2, rate=20.0))
    assert all(o.status == "finished" for o in run.outcomes)
    assert run.scheduler_stats.get("preemptions", 0) > 0 and run.num_blocks == 150


@needs_profiles
def test_stop_when_decided_keeps_attainment_exact():
    from loadgen.clients import SimClient
    from loadgen.metrics import attainment
    from loadgen.traces import TraceRequest
    trace = [TraceRequest(r.request_id, r.arrival_time * 0.1, r.prompt_len, r.output_len)  # 30 req/s: overload
             for r in small_trace(80, seed=3)]
    full = SimClient(sim_config, ttft_slo=0.5, tbt_slo=0.2, stop_when_decided=False).run(trace)
    fast = SimClient(sim_config, ttft_slo=0.5, tbt_slo=0.2, stop_when_decided=True).run(trace)
    assert attainment(fast.records) == attainment(full.records) < 0.9
    assert [r.attained for r in fast.records] == [r.attained for r in full.records]
    assert fast.info["steps"] <= full.info["steps"]


@needs_profiles
def test_sweep_command_writes_json_and_plots(tmp_path):
    from loadgen.cli import main
    from loadgen.traces import TraceRequest, write_trace
    trace = [TraceRequest(r.request_id, r.arrival_time, r.prompt_len, r.output_len) for r in small_trace(30)]
    write_trace(str(tmp_path / "trace.csv"), trace)
    out = tmp_path / "sweep"
    main(["sweep", "--sim", "--trace", str(tmp_path / "trace.csv"), "--policies", "fcfs", "--rates", "1,4",
          "--workers", "1", "--ttft-slo", "0.5", "--tbt-slo", "0.2", "--out-dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    runs = res["policies"]["fcfs"]["runs"]
    assert [r["rate"] for r in runs] == [1.0, 4.0] and all(0 <= r["attainment"] <= 1 for r in runs)
    for png in ("attainment.png", "ttft_cdf.png", "tbt_cdf.png"):
        assert (out / png).stat().st_size > 1000


def test_cpu_calibration_fits_real_step_times(tmp_path):
    from aptray.model.factory import make_tiny_model
    from aptray.sim.calibrate import Calibration, collect_steps, fastest_per_shape, fit_cpu, predict
    path = make_tiny_model(str(tmp_path / "opt"), "opt", hidden_size=64, num_layers=2, num_heads=4, max_positions=256)
    config = EngineConfig(model=path, num_cache_blocks=128, block_size=16)
    samples = collect_steps(config, batch_sizes=(1, 4), prompt_lens=(8, 96), output_len=8, repeats=2)
    cal = fit_cpu(fastest_per_shape(samples), config)
    assert cal.error.median < 0.5  # a shared, noisy CPU: docs/SIMULATOR.md reports the measured error
    cal.save(str(tmp_path / "cal.json"))
    back = Calibration.load(str(tmp_path / "cal.json"))
    assert np.allclose(predict(samples, config, back.hardware, back.step_overhead),
                       predict(samples, config, cal.hardware, cal.step_overhead))


# -- the cost model's terms, against hand-computed FLOPs and bytes --------------------------------
def _probe_hw(what: str):
    """A HardwareFit whose attention law returns FLOPs (what='flops') or bytes ('bytes') and whose GEMM law
    returns FLOPs; every other law costs nothing. Prices become counts that can be checked by hand."""
    import math
    from aptray.sim.fit import HardwareFit, LinearRoofline
    free = LinearRoofline(0.0, math.inf, math.inf)
    attn = LinearRoofline(0.0, 1.0, math.inf) if what == "flops" else LinearRoofline(0.0, math.inf, 1.0)
    gemm = LinearRoofline(0.0, 1.0, math.inf)
    return HardwareFit("probe", gemm, free, free, free, attn, {2: free, 4: free})


def _attn_and_gemm(model: CostModel, seqs):
    """(attention-only count, GEMM FLOPs) of one layer: GEMMs priced alone by a free attention law."""
    import math
    from dataclasses import replace
    from aptray.sim.fit import LinearRoofline
    total = model.attention_layer(seqs)
    gemm_only = CostModel(model.spec, replace(model.hw, attention=LinearRoofline(0.0, math.inf, math.inf)), model.tp,
                          model.hidden_attention, 0.0).attention_layer(seqs)
    return total - gemm_only, gemm_only


def test_absorbed_and_recompute_attention_terms_by_hand():
    s = spec("opt-13b")
    d, H, D, c = 5120, 40, 128, 1000
    assert (s.hidden_size, s.num_heads, s.head_dim) == (d, H, D)
    flops_hw, bytes_hw = _probe_hw("flops"), _probe_hw("bytes")
    one_kv, one_hidden = [SeqWork("kv", 1, c)], [SeqWork("hidden", 1, c)]
    # KV decode: q.K and a.V over the context, reading K and V (2*H*D per token, fp16)
    kv_f, kv_g = _attn_and_gemm(CostModel(s, flops_hw, 1, "absorbed", 0.0), one_kv)
    kv_b, _ = _attn_and_gemm(CostModel(s, bytes_hw, 1, "absorbed", 0.0), one_kv)
    assert (kv_f, kv_b, kv_g) == (4 * c * H * D, 2 * c * 2 * H * D, 0)
    # absorbed (docs/ARCHITECTURE.md section 2): scores u_h.x_t and y_h = sum a_t x_t over d for every head, reading
    # the hidden cache once (d per token); plus u_h = W_k,h^T q_h and W_v,h y_h, 2*d*H*D FLOPs each
    ab_f, ab_g = _attn_and_gemm(CostModel(s, flops_hw, 1, "absorbed", 0.0), one_hidden)
    ab_b, _ = _attn_and_gemm(CostModel(s, bytes_hw, 1, "absorbed", 0.0), one_hidden)
    assert ab_f == 4 * H * d * c and ab_b == 2 * c * d and ab_g == 2 * (2 * d * H * D)
    assert ab_b == kv_b / 2 and ab_f == kv_f * d / D  # half the bytes of KV, D times the FLOPs... per head: d/D
    # recompute: the K,V projection of the whole context (2*c*d*2HD FLOPs), then KV attention over the
    # re-projected scratch (written and read) after reading the hidden vectors
    rc_f, rc_g = _attn_and_gemm(CostModel(s, flops_hw, 1, "recompute", 0.0), one_hidden)
    rc_b, _ = _attn_and_gemm(CostModel(s, bytes_hw, 1, "recompute", 0.0), one_hidden)
    assert rc_f == 4 * c * H * D and rc_g == 2 * c * d * (2 * H * D) and rc_b == 2 * (c * d + 2 * c * 2 * H * D)
    assert rc_g / (ab_f + ab_g) > D / 2  # recompute does ~D/2 times the work of absorbed at this context
    # a hidden prefill chunk over a cached hidden prefix re-projects the prefix's K,V (the engine's path)
    q = 256
    _, pf_g = _attn_and_gemm(CostModel(s, flops_hw, 1, "absorbed", 0.0), [SeqWork("hidden", q, c)])
    _, pf_kv_g = _attn_and_gemm(CostModel(s, flops_hw, 1, "absorbed", 0.0), [SeqWork("kv", q, c)])
    assert (pf_g, pf_kv_g) == (2 * (c - q) * d * (2 * H * D), 0)


def test_sharded_hidden_terms_and_memory():
    from aptray.sim.memory import sharded_hidden_extra_weights
    s, t, c = spec("opt-30b"), 2, 1000
    d, H, D = s.hidden_size, s.num_heads, s.head_dim
    one_hidden = [SeqWork("hidden", 1, c)]
    rep_b, _ = _attn_and_gemm(CostModel(s, _probe_hw("bytes"), t, "absorbed", 0.0), one_hidden)
    sh_b, _ = _attn_and_gemm(CostModel(s, _probe_hw("bytes"), t, "absorbed", 0.0, hidden_sharded=True), one_hidden)
    sh_f, sh_g = _attn_and_gemm(CostModel(s, _probe_hw("flops"), t, "absorbed", 0.0, hidden_sharded=True), one_hidden)
    assert rep_b == 2 * c * d and sh_b == 2 * c * d // t  # each rank reads its d/t slice
    assert sh_f == 4 * H * (d // t) * c  # partial scores and sums of all heads over the slice
    assert sh_g == 2 * (2 * d * H * D // t)
    # the W_k, W_v column slices beyond the rank's own heads: 2*H*D*(d/t)*(1 - 1/t) per layer
    assert sharded_hidden_extra_weights(s, t) == 2 * s.num_layers * (2 * H * D // 2) * (d // 2)
    assert sharded_hidden_extra_weights(s, 1) == 0


def test_sharded_hidden_config_and_pool():
    from aptray.sim.hidden_sharding import hidden_is_sharded, shard_hidden
    from aptray.sim.runner import build_engine
    path = os.path.join(configs_dir(), "opt-30b")
    plain = EngineConfig(model=path, scheduler="apt", cache_mode="auto", tensor_parallel_size=2)
    assert plain.cache_mode == "kv" and not hidden_is_sharded(plain)  # replicated hidden: r = 1 per rank
    sharded = shard_hidden(EngineConfig(model=path, scheduler="apt", cache_mode="auto", tensor_parallel_size=2))
    assert sharded.cache_mode == "hybrid" and sharded.hidden_block_size == 2 * sharded.block_size
    assert hidden_is_sharded(sharded)
    one = EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), cache_mode="hybrid")
    assert shard_hidden(one) is one and not hidden_is_sharded(one)  # TP 1: nothing to shard
    e_plain, x_plain = build_engine(plain, "a100-40gb")
    e_sh, x_sh = build_engine(sharded, "a100-40gb")
    assert x_sh.cost_model.hidden_sharded and not x_plain.cost_model.hidden_sharded
    assert x_sh.num_blocks < x_plain.num_blocks  # the extra weight slices take pool memory
    assert e_sh.blocks.hidden_enabled and not e_plain.blocks.hidden_enabled


def test_plan_time_equals_step_time():
    from aptray.plan import BatchPlan, ConversionPlan, SeqPlan
    rng = np.random.default_rng(0)
    for mode, sharded, tp in (("absorbed", False, 1), ("recompute", False, 1), ("absorbed", True, 2)):
        model = CostModel(spec("opt-13b"), hardware_for(GPUS["a100-40gb"]), tp, mode, 1e-3, 2e-5, sharded)
        for _ in range(20):
            seqs = []
            for i in range(int(rng.integers(1, 12))):
                q = 1 if rng.random() < 0.7 else int(rng.integers(2, 300))
                start = int(rng.integers(0 if q > 1 else 1, 900))
                seqs.append(SeqPlan(f"r{i}", (5,) * q, start, str(rng.choice(["kv", "hidden"])), (), bool(rng.random() < 0.9)))
            convs = (ConversionPlan("x", 40, "kv", (), ()),) if rng.random() < 0.3 else ()
            plan = BatchPlan(0, tuple(seqs), convs)
            tuples = [(p.cache_kind, len(p.token_ids), p.context_len, p.sample) for p in seqs]
            assert model.plan_time(plan) == pytest.approx(model.step_time(tuples, [(c.to_kind, c.num_tokens) for c in convs]),
                                                          rel=1e-12)
    m = CostModel(spec("opt-13b"), hardware_for(GPUS["a100-40gb"]), 1, "absorbed", 0.0, 1e-4)
    z = CostModel(spec("opt-13b"), hardware_for(GPUS["a100-40gb"]), 1, "absorbed", 0.0, 0.0)
    three = [SeqWork("kv", 1, 100)] * 3
    assert m.step_time(three) - z.step_time(three) == pytest.approx(3e-4)  # host time per sequence


@needs_profiles
@pytest.mark.parametrize("policy,kw", [("fcfs", {}), ("sarathi", {"enable_chunked_prefill": True}),
                                       ("apt", {"cache_mode": "hybrid"})])
def test_lean_step_matches_engine_step(policy, kw):
    from aptray.sim.runner import simulate
    reqs = small_trace(50, seed=4, rate=8.0)
    lean = simulate(sim_config(policy, num_cache_blocks=300, **kw), reqs, lean=True)
    full = simulate(sim_config(policy, num_cache_blocks=300, **kw), reqs, lean=False)
    assert [(o.status, o.token_times, o.num_preemptions) for o in lean.outcomes] == \
        [(o.status, o.token_times, o.num_preemptions) for o in full.outcomes]
    assert lean.steps == full.steps and lean.scheduler_stats == full.scheduler_stats


@needs_profiles
def test_step_jitter_is_seeded_and_median_preserving():
    from dataclasses import replace
    from aptray.sim.runner import simulate
    reqs = small_trace(30, seed=5)
    hw = hardware_for(GPUS["a100-40gb"])
    flat = simulate(sim_config(), reqs, hardware=hw)
    a = simulate(sim_config(), reqs, hardware=replace(hw, step_jitter=(-0.1, 0.0, 0.1)))
    b = simulate(sim_config(), reqs, hardware=replace(hw, step_jitter=(-0.1, 0.0, 0.1)))
    assert [o.token_times for o in a.outcomes] == [o.token_times for o in b.outcomes]
    assert [o.token_times for o in a.outcomes] != [o.token_times for o in flat.outcomes]
    assert a.busy_time / a.steps == pytest.approx(flat.busy_time / flat.steps, rel=0.05)


def test_replicate_scatter_and_median_per_shape():
    from aptray.sim.calibrate import StepSample, median_per_shape, replicate_scatter
    shape = [("kv", 1, 10, True)]
    samples = [StepSample(shape, [], t) for t in (1.0, 2.0, 4.0)] + [StepSample([("kv", 5, 5, True)], [], 3.0)]
    med = {tuple(s.seqs): s.seconds for s in median_per_shape(samples)}
    assert med == {tuple(shape): 2.0, (("kv", 5, 5, True),): 3.0}
    assert sorted(replicate_scatter(samples)) == pytest.approx([np.log(0.5), 0.0, np.log(2.0)])


def test_calibration_round_trip_keeps_host_terms(tmp_path):
    from dataclasses import replace
    from aptray.sim.calibrate import Calibration, _unpack, _X0
    import math
    hw, overhead = _unpack([math.log(v) for v in _X0])
    cal = Calibration(hw, overhead, __import__("aptray.sim.fit", fromlist=["FitError"]).FitError(0.1, 0.1, 0.2, 5))
    cal = cal.with_jitter([-0.2, 0.1])
    cal.save(str(tmp_path / "c.json"))
    back = Calibration.load(str(tmp_path / "c.json"))
    assert back.seq_overhead == pytest.approx(_X0[1]) and back.hardware.step_jitter == (-0.2, 0.1)
    assert back.hardware.ragged_overhead == pytest.approx(_X0[2])
    assert back.step_overhead == pytest.approx(overhead)
    assert replace(back.hardware, step_jitter=()).seq_overhead == back.seq_overhead
    # a step whose KV decodes have unequal contexts (the CPU engine masks them) pays the ragged term
    from aptray.config import ModelSpec
    spec = ModelSpec("opt", 64, 2, 4, 4, 16, 512, 256, False, 256)
    cost = CostModel(spec, back.hardware, 1, "absorbed", overhead, back.seq_overhead,
                     ragged_overhead=back.hardware.ragged_overhead)
    even, ragged = [("kv", 1, 40, 1), ("kv", 1, 40, 1)], [("kv", 1, 40, 1), ("kv", 1, 41, 1)]
    assert cost.step_time(ragged) - cost.step_time(even) == pytest.approx(_X0[2], rel=0.2)
    # a step with an absorbed hidden decode pays the hidden layer term once per layer, however many decode
    assert back.hardware.hidden_layer_overhead == pytest.approx(_X0[11])
    kv, one, two = [("kv", 1, 40, 1)] * 2, [("kv", 1, 40, 1), ("hidden", 1, 40, 1)], [("hidden", 1, 40, 1)] * 2
    zero = CostModel(spec, replace(back.hardware, hidden_layer_overhead=0.0), 1, "absorbed", overhead,
                     back.seq_overhead)
    for seqs in (one, two):
        assert cost.step_time(seqs) - zero.step_time(seqs) == pytest.approx(spec.num_layers * _X0[11])
    assert cost.step_time(kv) == zero.step_time(kv)


@needs_profiles
def test_sweep_is_deterministic_across_worker_counts():
    from loadgen.clients import SimClient
    from loadgen.experiment import run_grid
    from loadgen.traces import TraceRequest
    trace = [TraceRequest(r.request_id, r.arrival_time, r.prompt_len, r.output_len) for r in small_trace(40, seed=6)]
    clients = {"fcfs": SimClient(sim_config, ttft_slo=0.5, tbt_slo=0.2),
               "apt": SimClient(lambda: sim_config("apt", cache_mode="hybrid"), ttft_slo=0.5, tbt_slo=0.2)}
    key = lambda runs: [(r["policy"], r["rate"], r["summary"], r["ttfts"], r["gaps"]) for r in runs]  # noqa: E731
    one = run_grid(clients, trace, [2.0, 6.0], 1.0, 0, workers=1, progress=False)
    two = run_grid(clients, trace, [2.0, 6.0], 1.0, 0, workers=2, progress=False)
    again = run_grid(clients, trace, [2.0, 6.0], 1.0, 0, workers=2, progress=False)
    assert key(one) == key(two) == key(again)


@needs_profiles
def test_a_scheduler_that_never_samples_is_stopped_as_stalled(monkeypatch):
    """The stuck-engine guard: plans that compute without ever sampling (a request planned empty for
    ever, docs/SCHEDULER.md) end the run as stalled instead of spinning for hours; a healthy run is
    never stalled."""
    from aptray.scheduler.base import Scheduler
    from aptray.sim import runner
    healthy = runner.simulate(sim_config(), small_trace(10, seed=3))
    assert not healthy.stalled and all(o.status == "finished" for o in healthy.outcomes)
    seq_plan = Scheduler._seq_plan
    monkeypatch.setattr(Scheduler, "_seq_plan",
                        lambda self, req, n: seq_plan(self, req, n)._replace(sample=False))
    monkeypatch.setattr(runner, "MAX_STEPS_WITHOUT_TOKEN", 300)
    run = runner.simulate(sim_config(), small_trace(10, seed=3))
    assert run.stalled and run.stopped_early
    assert all(o.status == "unfinished" and not o.token_times for o in run.outcomes)
