"""Routing across replicas without a cluster: the TTFT estimator, the ranking, what the router reads of a
request, the goodput autoscaling policy, the deployment options and the simulator's multi-replica mode.
The served router on a real two-replica app is tests/test_serve_routing.py."""
import math
import os
import pickle
import random
import time
import warnings
from dataclasses import replace

import pytest

from aptray.serve.routing_policy import PREFIX, SLO, UNMEETABLE, RequestHint, SentLog, rank, shared_stream_s
from aptray.serve.ttft_estimate import ReplicaLoad, ServingDelay, StepSpeed, predict_ttft, prefill_seconds

COST = (0.01, 1e-4, 1e-3)  # 10 ms a step, 0.1 ms a prefill token, 1 ms a decode


def load(**kw) -> ReplicaLoad:
    base = dict(taken_at=100.0, free_blocks=1000, num_blocks=1000, block_tokens={"kv": 16}, step_cost=COST,
                token_budget=2048, mixed=True)
    return ReplicaLoad(**{**base, **kw})


# -- the estimator ---------------------------------------------------------------------------------
def test_ttft_grows_with_the_queue_and_the_decodes():
    idle, queued, decoding = load(), load(queued_tokens=4000, queued=8), load(decoding=40)
    assert predict_ttft(idle, 100, 100.0) == pytest.approx(0.01 + 100 * 1e-4)  # one step, its tokens
    assert predict_ttft(queued, 100, 100.0) > predict_ttft(idle, 100, 100.0) + 4000 * 1e-4
    # mixed steps carry the decodes: 40 of them add 40 ms to every step, and half a step is under way
    assert predict_ttft(decoding, 100, 100.0) == pytest.approx(0.05 / 2 + 0.05 + 100 * 1e-4)


def test_the_queue_drains_while_the_snapshot_ages_and_own_sends_add_to_it():
    queued = load(queued_tokens=4000)
    fresh, later = predict_ttft(queued, 100, 100.0), predict_ttft(queued, 100, 100.2)
    assert later == pytest.approx(fresh - 0.2)
    assert predict_ttft(queued, 100, 100.0, sent_tokens=2000) == pytest.approx(fresh + 0.2 + 0.01)


def test_a_full_pool_waits_for_blocks_by_the_release_curve_or_the_freed_rate():
    full = load(free_blocks=0, release=((0.5, 10), (2.0, 100)))
    base = predict_ttft(load(), 100, 100.0)
    assert predict_ttft(full, 100, 100.0) == pytest.approx(base + 0.5)  # 7 blocks: the first point frees 10
    assert predict_ttft(load(free_blocks=0, release=((0.5, 10), (2.0, 100)), freed_blocks_per_s=70), 100,
                        100.0) == pytest.approx(base + 0.1)  # the measured rate frees 7 in 0.1 s
    # past the curve, the blocks come back from requests queued ahead as they finish: at the measured
    # rate, or (no finish seen yet) when the curve ends; never a wait without end
    assert predict_ttft(load(free_blocks=0, release=((0.5, 3),), freed_blocks_per_s=70), 100,
                        100.0) == pytest.approx(base + 0.1)
    assert predict_ttft(load(free_blocks=0, release=((0.5, 3),)), 100, 100.0) == pytest.approx(base + 0.5)
    assert predict_ttft(load(ok=False), 1, 100.0) == math.inf


def test_the_serving_path_adds_its_delay_per_stream_relayed_with_the_new_one():
    relaying = load(stream_s=0.02, streams=4)
    assert predict_ttft(relaying, 100, 100.0) == pytest.approx(predict_ttft(load(), 100, 100.0) + 5 * 0.02)
    # requests the router sent since the snapshot are streams there too
    assert predict_ttft(relaying, 100, 100.0, sent_tokens=20, sent_requests=2) == pytest.approx(
        predict_ttft(load(), 100, 100.0, sent_tokens=20, sent_requests=2) + 7 * 0.02)


def test_the_ingress_learns_the_serving_delay_per_stream_from_its_requests():
    """Each request's time from admission to its first chunk, less the engine's prediction then, as
    stream_s x streams (ttft_estimate.ServingDelay); a replica idle or never measured adds nothing,
    and a request re-attached after a router restart is not measured."""
    delay = ServingDelay()
    assert delay.begin(100, 0) is None  # no engine load yet: nothing to subtract
    delay.engine_load = load()
    engine_s = predict_ttft(load(), 100, time.time())
    for streams in (0, 3, 7, 1, 12, 5, 0, 9):
        probe = delay.begin(100, streams)
        assert probe.streams == streams + 1 and probe.engine_s == pytest.approx(engine_s, rel=1e-3)
        # as if its first chunk came 4 ms per stream (itself included) after the engine's wait
        delay.first_chunk(replace(probe, started=probe.started - engine_s - 0.004 * probe.streams))
    assert delay.stream_s == pytest.approx(0.004, rel=0.05)
    restarted = delay.begin(100, 0)  # its router died before its first chunk: 5 s of restart
    delay.first_chunk(replace(restarted, started=restarted.started - 5.0), reattached=True)
    assert delay.stream_s == pytest.approx(0.004, rel=0.05)
    delay.engine_load = load(ok=False)
    assert delay.begin(100, 0) is None  # a router being replaced predicts nothing


def test_a_burst_of_short_prompts_spreads_when_the_serving_path_is_priced():
    """Two decoding replicas whose fitted steps differ by 2 ms: by the steps alone, the 1 ms of
    prefill that 10 short prompts add never outweighs it and the whole burst goes to the cheaper
    one; with what each stream costs the serving path, the burst spreads as the streams do."""
    def burst(stream_s: float) -> list:
        loads = {"a": load(step_cost=(0.008, 1e-5, 1e-3), decoding=10, stream_s=stream_s),
                 "b": load(step_cost=(0.010, 1e-5, 1e-3), decoding=10, stream_s=stream_s)}
        sent, picks = SentLog(), []
        for i in range(10):
            first = rank(RequestHint(10, 1.0), loads, sent, 100.0 + i * 1e-3, 2.0).order[0]
            sent.add(first, 10, 100.0 + i * 1e-3)
            picks.append(first)
        return picks
    assert burst(0.0) == ["a"] * 10
    assert sorted(burst(0.01)) == ["a"] * 5 + ["b"] * 5


def test_a_burst_spreads_whatever_serving_delays_the_replicas_learned_apart():
    """Three equal replicas whose serving-delay fits disagree (as measured: 0.010, 0.057 and 0.058 s per
    stream at once). Priced each at its own figure, the one reporting least took 7 of a 9-request
    burst; priced at their mean (routing_policy.shared_stream_s), the burst spreads by the streams."""
    loads = {"a": load(stream_s=0.010), "b": load(stream_s=0.057), "c": load(stream_s=0.058)}
    sent, picks = SentLog(), []
    for i in range(9):
        first = rank(RequestHint(10, 1.0), loads, sent, 100.0 + i * 1e-3, 2.0).order[0]
        sent.add(first, 10, 100.0 + i * 1e-3)
        picks.append(first)
    assert sorted(picks) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    # a replica that takes no requests has no say in the shared figure
    assert shared_stream_s([load(stream_s=0.01), load(stream_s=0.03), load(ok=False, stream_s=9.0)]) == \
        pytest.approx(0.02)
    assert shared_stream_s([]) == 0.0


def test_a_cold_replica_predicts_a_burst_larger_than_its_pool_by_its_prefill():
    """Nothing running or finished yet, 60 queued prompts of 480 tokens against 128 blocks of 16:
    the new request waits for the queue's prefill, not for blocks without end (shed_unmeetable
    refused a relaxed request there)."""
    cold = load(free_blocks=128, num_blocks=128, queued_tokens=60 * 480, queued=60)
    predicted = predict_ttft(cold, 480, 100.0)
    assert predicted == pytest.approx(0.01 / 2 + prefill_seconds(cold, 60 * 480) + prefill_seconds(cold, 480))
    assert predicted < 60


def test_fcfs_prefills_alone_in_budget_sized_steps():
    fcfs = load(mixed=False, decoding=40, token_budget=1000)
    assert prefill_seconds(fcfs, 2500) == pytest.approx(3 * 0.01 + 2500 * 1e-4)


def test_stats_round_trip_and_malformed_stats_are_ignored():
    original = load(queued_tokens=7, held_blocks={"kv": 3}, release=((0.1, 2),), prefixes=("p",), stream_s=0.02,
                    streams=3)
    assert ReplicaLoad.from_stats(original.to_stats()) == original
    for bad in (None, {}, {"taken_at": "x"}, {"taken_at": 1.0, "step_cost": [1, 2]}, {"taken_at": float("nan")},
                {"taken_at": 1.0, "bogus": 1}, {"taken_at": 1.0, "release": [[1]]}, [1, 2],
                {"taken_at": 1.0, "stream_s": float("inf")}, {"taken_at": 1.0, "streams": "x"}):
        assert ReplicaLoad.from_stats(bad) is None or bad == {"taken_at": 1.0, "bogus": 1}
    assert ReplicaLoad.from_stats({"taken_at": 1.0, "bogus": 1}).taken_at == 1.0  # unknown keys: newer replicas


def test_step_speed_recovers_a_linear_step_cost():
    speed, rng = StepSpeed(), random.Random(0)
    for _ in range(300):
        prefill, decodes = rng.choice((0, rng.randint(1, 2000))), rng.randint(0, 64)
        speed.observe(prefill, decodes, 0.004 + 2e-5 * prefill + 3e-4 * decodes)
    assert speed.coef == pytest.approx((0.004, 2e-5, 3e-4), rel=1e-3)
    only_decodes = StepSpeed(prior_c0=0.002)
    assert only_decodes.coef == (0.002, 0.0, 0.0)
    for d in range(1, 50):
        only_decodes.observe(0, d, 0.001 * d)
    assert all(c >= 0 for c in only_decodes.coef)


# -- the ranking ---------------------------------------------------------------------------------
def test_most_headroom_first_then_unknown_then_late_then_down():
    loads = {"busy": load(queued_tokens=3000), "idle": load(), "late": load(queued_tokens=30000),
             "down": load(ok=False), "new": None}
    r = rank(RequestHint(100, 1.0), loads, SentLog(), 100.0, stale_after_s=2.0)
    assert r.order == ["idle", "busy", "new", "late", "down"] and r.reason == SLO


def test_among_equal_predictions_fewest_in_flight_first_and_clear_headroom_still_wins():
    loads = {"idle": load(), "decoding": load(decoding=5), "busy": load(queued_tokens=3000)}
    hint = RequestHint(100, 1.0)
    # 20 ms against 32.5 ms predicted: equal within a tenth of the 1 s SLO; 345 ms is not
    counts = {"idle": 7, "decoding": 2, "busy": 0}
    r = rank(hint, loads, SentLog(), 100.0, 2.0, in_flight=counts, equal_fraction=0.1)
    assert r.order == ["decoding", "idle", "busy"] and r.reason == SLO
    # off (the default): most headroom first, whatever is in flight
    assert rank(hint, loads, SentLog(), 100.0, 2.0, in_flight=counts).order == ["idle", "decoding", "busy"]
    # where the caller counts none, the snapshot's requests (queued + decoding) stand in
    assert rank(hint, loads, SentLog(), 100.0, 2.0, equal_fraction=0.1).order == ["idle", "decoding", "busy"]
    # a tight SLO makes them unequal again: most headroom first
    assert rank(RequestHint(100, 0.1), loads, SentLog(), 100.0, 2.0, in_flight=counts,
                equal_fraction=0.1).order[:2] == ["idle", "decoding"]


def test_a_request_lost_everywhere_goes_where_it_delays_no_savable_one():
    loads = {"busy": load(queued_tokens=3000), "idle": load(), "late": load(queued_tokens=30000),
             "down": load(ok=False), "new": None}
    r = rank(RequestHint(100, 0.001), loads, SentLog(), 100.0, stale_after_s=2.0)
    assert r.order == ["late", "busy", "idle", "new", "down"] and r.reason == UNMEETABLE


def test_stale_stats_leave_the_choice_to_the_default():
    loads = {"a": load(taken_at=90.0), "b": None}
    assert rank(RequestHint(100, 1.0), loads, SentLog(), 100.0, stale_after_s=2.0) is None


def test_sends_since_the_snapshot_spread_a_burst():
    loads, sent, picks = {"a": load(), "b": load()}, SentLog(), []
    for i in range(6):
        first = rank(RequestHint(500, 1.0), loads, sent, 100.0 + i * 1e-3, 2.0).order[0]
        sent.add(first, 500, 100.0 + i * 1e-3)
        picks.append(first)
    assert sorted(picks) == ["a"] * 3 + ["b"] * 3
    sent.remove("a", 500)
    assert sent.since("a", 100.0, 100.01) == (1000, 2)
    assert sent.since("a", 200.0, 200.0) == (0, 0)  # all older than the snapshot: in it already


def test_a_prefix_holder_goes_first_when_it_meets_the_slo():
    loads = {"idle": load(), "holder": load(queued_tokens=2000, prefixes=("sys",))}
    r = rank(RequestHint(100, 1.0, prefix="sys"), loads, SentLog(), 100.0, 2.0)
    assert r.order[0] == "holder" and r.reason == PREFIX
    r = rank(RequestHint(100, 0.05, prefix="sys"), loads, SentLog(), 100.0, 2.0)
    assert r.order[0] == "idle" and r.reason == SLO  # the prefix would cost the SLO


# -- what the router reads of a request -----------------------------------------------------------
def _http(method="POST", path="/v1/completions", headers=()):
    from ray.serve._private.common import StreamingHTTPRequest
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    return type("PR", (), {"args": [pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))]})()


def test_http_hints_from_headers_or_content_length():
    from aptray.serve.route_hints import hint_of
    h = hint_of(_http(headers=[(b"x-aptray-ttft-ms", b"250"), (b"x-aptray-prompt-tokens", b"77")]), 1.0)
    assert (h.prompt_tokens, h.ttft_slo) == (77, 0.25)
    h = hint_of(_http(path="/app/v1/chat/completions", headers=[(b"content-length", b"4128")]), 1.5)
    assert (h.prompt_tokens, h.ttft_slo) == (1000, 1.5)
    for junk in (b"nan", b"-3", b"inf", b"abc", b"\xff"):
        assert hint_of(_http(headers=[(b"x-aptray-ttft-ms", junk)]), 2.0).ttft_slo == 2.0
    h = hint_of(_http(headers=[(b"x-aptray-prompt-tokens", b"1000000"), (b"content-length", b"300")]), 1.0)
    assert h.prompt_tokens == 300  # a claim beyond the body's bytes would steer the router: capped
    assert hint_of(_http(method="GET", path="/metrics"), 1.0) is None
    for args in ([b"not a pickle"], [1, 2], ["text"], []):
        assert hint_of(type("PR", (), {"args": args})(), 1.0) is None
    assert hint_of(object(), 1.0) is None


def test_grpc_hints_from_the_request_message():
    from ray.serve._private.common import gRPCRequest

    from aptray.proto import generate_pb2
    from aptray.serve.route_hints import hint_of

    def pr(msg):
        return type("PR", (), {"args": [pickle.dumps(gRPCRequest(user_request_proto=msg))]})()
    msg = generate_pb2.GenerateRequest(prompt_token_ids=generate_pb2.TokenIds(ids=[5] * 300))
    msg.slo.ttft_ms = 400
    assert (hint_of(pr(msg), 1.0).prompt_tokens, hint_of(pr(msg), 1.0).ttft_slo) == (300, 0.4)
    text = generate_pb2.GenerateRequest(prompt="x" * 800)
    assert (hint_of(pr(text), 1.0).prompt_tokens, hint_of(pr(text), 1.0).ttft_slo) == (200, 1.0)


def test_a_prefix_key_is_bounded_visible_ascii_and_tagged_alike_everywhere():
    from aptray.serve.prefix_key import MAX_KEY_BYTES, prefix_tag
    tag = prefix_tag("conv-7")
    assert tag == prefix_tag(b"conv-7") != prefix_tag("conv-8") and len(tag) == 16
    assert prefix_tag("k" * MAX_KEY_BYTES) is not None
    for junk in ("", "k" * (MAX_KEY_BYTES + 1), "a b", "tab\t", "caf\u00e9", b"\xff", b"nul\x00", None, 7):
        assert prefix_tag(junk) is None, junk


def test_hints_carry_the_prefix_key_of_the_header_or_the_message():
    from ray.serve._private.common import gRPCRequest

    from aptray.proto import generate_pb2
    from aptray.serve.prefix_key import prefix_tag
    from aptray.serve.route_hints import hint_of
    h = hint_of(_http(headers=[(b"x-aptray-ttft-ms", b"250"), (b"x-aptray-prefix-key", b"conv-7")]), 1.0)
    assert (h.prefix, h.ttft_slo) == (prefix_tag("conv-7"), 0.25)
    assert hint_of(_http(), 1.0).prefix is None
    for junk in (b"", b"k" * 129, b"two words", b"\xff\xfe"):  # ignored: the request still routes by its SLO
        h = hint_of(_http(headers=[(b"x-aptray-prefix-key", junk), (b"x-aptray-ttft-ms", b"250")]), 1.0)
        assert h is not None and h.prefix is None and h.ttft_slo == 0.25

    def pr(msg):
        return type("PR", (), {"args": [pickle.dumps(gRPCRequest(user_request_proto=msg))]})()
    msg = generate_pb2.GenerateRequest(prompt="x" * 80, prefix_key="conv-7")
    assert hint_of(pr(msg), 1.0).prefix == prefix_tag("conv-7")
    assert hint_of(pr(generate_pb2.GenerateRequest(prompt="x" * 80)), 1.0).prefix is None


# -- autoscaling, deployment options ---------------------------------------------------------------
def test_goodput_policy_scales_on_attainment_and_pressure():
    from aptray.serve.autoscale import GoodputPolicy
    p = GoodputPolicy(target_attainment=0.9, upscale_pressure=0.8, downscale_pressure=0.3)
    assert p.desired(2, [0.5, 0.6], attained=95, ended=100) == 2  # meets, moderately loaded: stay
    assert p.desired(2, [0.5, 0.6], attained=70, ended=100) == 3  # misses: one more at least
    assert p.desired(2, [2.0, 2.2], attained=95, ended=100) == 8  # the pressure says 2 x 2.1 / 0.55
    assert p.desired(4, [0.1, 0.1, 0.0, 0.1], attained=100, ended=100) == 3  # idle: one fewer a step
    assert p.desired(4, [0.1] * 4, attained=50, ended=100) == 5  # idle by TTFT but missing: up
    assert p.desired(2, [0.5, 0.5], attained=0, ended=3) == 1  # quiet: too few requests to judge attainment
    assert p.desired(2, [0.9, 0.9], attained=0, ended=3) == 4  # quiet, but what comes waits too long
    assert p.desired(1, [0.0], attained=0, ended=0) == 1


def test_goodput_policy_reads_serves_context():
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from aptray.serve.autoscale import GoodputPolicy
    dep = DeploymentID("Ingress", "aptray")
    reps = [ReplicaID("a", dep), ReplicaID("b", dep)]

    def ctx(metrics):
        return AutoscalingContext(dep, "Ingress", "aptray", 2, 2, reps, 8.0, 0.0, metrics, None, 1, 4, {}, None, None,
                                  0.0, AutoscalingConfig(min_replicas=1, max_replicas=4))
    metrics = {"aptray_ttft_pressure": {reps[0]: 1.5, reps[1]: 1.7}, "aptray_attained": {reps[0]: 40, reps[1]: 30},
               "aptray_ended": {reps[0]: 50, reps[1]: 50}}
    assert GoodputPolicy()(ctx(metrics)) == (6, {})
    desired, _ = GoodputPolicy()(ctx({}))  # no aptray metrics yet: Serve's default on ongoing requests
    assert desired == pytest.approx(2 * 8.0 / (2 * 2))


def test_build_app_args_set_the_router_and_autoscaling():
    from aptray.serve.args import AppArgs
    from aptray.serve.deploy_options import POLICY, ROUTER_CLASS, deployment_options
    opts = deployment_options(AppArgs.parse({"num_replicas": "3", "routing_stats_period_s": "0.25",
                                             "routing_equal_ttft_fraction": "0.1"}))  # strings: CLI
    router = opts["request_router_config"]
    assert opts["num_replicas"] == 3 and router.request_router_class == ROUTER_CLASS
    assert router.request_routing_stats_period_s == 0.25 and router.request_router_kwargs["stale_after_s"] == 3.0
    assert router.request_router_kwargs["equal_ttft_fraction"] == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Serve warns of settings a later release will refuse
        opts = deployment_options(AppArgs.parse({"routing": "default", "min_replicas": "2", "max_replicas": "5"}))
    assert "SloRouter" not in opts["request_router_config"].request_router_class and "num_replicas" not in opts
    scaling = opts["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.initial_replicas) == (2, 5, 2)
    assert scaling.policy.policy_function == POLICY
    for bad in ({"routing": "random"}, {"min_replicas": 3, "max_replicas": 2}, {"max_replicas": 0},
                {"routing_equal_ttft_fraction": "-0.1"}, {"routing_equal_ttft_fraction": "nan"},
                {"routing_equal_ttft_fraction": 1.0}):
        with pytest.raises(ValueError):
            AppArgs.parse(bad)


# -- the simulator's multi-replica mode -------------------------------------------------------------
def _sim_config():
    from aptray.config import EngineConfig
    from aptray.sim import configs_dir
    return EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), scheduler="apt", cache_mode="hybrid",
                        ttft_slo=0.25, tbt_slo=0.1)


def test_load_tracker_reads_a_real_scheduler():
    from aptray.sampling_params import SamplingParams
    from aptray.serve.ttft_estimate import LoadTracker
    from aptray.sim.runner import build_engine
    config = _sim_config()
    engine, executor = build_engine(config, "a100-40gb")
    tracker = LoadTracker(config)
    for i, n in enumerate((300, 500, 200)):
        engine.add_request(str(i), [5] * n, SamplingParams(max_tokens=40, ignore_eos=True), arrival_time=0.0)
    snap = tracker.snapshot(engine.scheduler, 0.0, 0.0, inbox_tokens=50, inbox=1)
    assert (snap.queued_tokens, snap.queued, snap.decoding) == (1050, 4, 0)
    assert snap.block_tokens == {"kv": 16, "hidden": 32} and snap.free_blocks == snap.num_blocks
    assert tracker.snapshot(engine.scheduler, 1.0, 1.0).queued == 0  # apt: past their 0.25 s TTFT, served last
    while engine.has_unfinished() and len(engine.scheduler.running) < 3:
        step = engine.step()
        tracker.on_step(step.plan, step.result.step_time)
    snap = tracker.snapshot(engine.scheduler, executor.clock.now, executor.clock.now)
    assert snap.decoding == 3 and sum(snap.held_blocks.values()) > 0 and snap.free_blocks < snap.num_blocks
    assert snap.release[-1][1] == sum(snap.held_blocks.values()) and tracker.speed.observations > 0


def test_prefix_holders_remember_the_newest_keys_and_report_a_bounded_few():
    from aptray.request import Request
    from aptray.sampling_params import SamplingParams
    from aptray.serve.prefix_holders import PrefixHolders

    class AllCached:
        def is_cached(self, key):
            return True
    holders = PrefixHolders({"kv": 4, "hidden": 8}, max_keys=4, max_reported=3)
    for i in range(6):
        holders.note(f"t{i}", Request(str(i), [i] * 10, SamplingParams(), 0.0, 1.0, 1.0))
    holders.note("short", Request("s", [1, 2, 3], SamplingParams(), 0.0, 1.0, 1.0))  # no full block: none cached
    holders.note("t3", Request("again", [9] * 10, SamplingParams(), 0.0, 1.0, 1.0))  # a newer turn of t3
    assert holders.held(AllCached()) == ("t3", "t5", "t4")
    assert len(holders._keys) == 4 and len(holders._keys["t3"]) == 2  # one key per cache kind


def test_load_tracker_reports_a_named_prefix_while_its_last_prompt_block_is_cached():
    import json
    from dataclasses import replace

    from aptray.sampling_params import SamplingParams
    from aptray.serve.prefix_key import prefix_tag
    from aptray.serve.route_hints import hint_of
    from aptray.serve.routing_policy import ParsedLoads
    from aptray.serve.ttft_estimate import LoadTracker
    from aptray.sim.prompt_ids import stream_ids
    from aptray.sim.runner import build_engine
    config = replace(_sim_config(), num_cache_blocks=40)
    engine, executor = build_engine(config, "a100-40gb")
    tracker = LoadTracker(config)
    tag = prefix_tag("conv-7")

    def admit(rid, prompt, prefix=None):
        req = engine.add_request(rid, prompt, SamplingParams(max_tokens=4, ignore_eos=True),
                                 arrival_time=executor.clock.now)
        tracker.on_add(req, prefix)

    def finish_all():
        while engine.has_unfinished():
            engine.step()

    def reported():
        return tracker.snapshot(engine.scheduler, executor.clock.now, executor.clock.now).prefixes
    admit("turn-1", stream_ids("conv-7", 200), tag)
    assert reported() == ()  # nothing of it computed yet
    finish_all()
    assert reported() == (tag,)
    stats = json.loads(json.dumps(tracker.snapshot(engine.scheduler, 100.0, 100.0).to_stats()))
    hint = hint_of(_http(headers=[(b"x-aptray-ttft-ms", b"60000"), (b"x-aptray-prefix-key", b"conv-7")]), 1.0)
    r = rank(hint, {"idle": load(), **ParsedLoads().of({"holder": stats})}, SentLog(), 100.0, 2.0)
    assert r.order[0] == "holder" and r.reason == PREFIX  # the stats carry the tag the router computes
    hits = engine.scheduler.stats["prefix_hit_tokens"]
    admit("turn-2", stream_ids("conv-7", 260), tag)  # turn 1's prompt and more
    finish_all()
    assert engine.scheduler.stats["prefix_hit_tokens"] - hits >= 192 and reported() == (tag,)
    for i in range(6):  # others fill the pool: turn 2's blocks are evicted, the tail first
        admit(f"other-{i}", stream_ids(f"other-{i}", 500))
        finish_all()
    assert engine.blocks.evictions > 0 and reported() == ()


@pytest.mark.parametrize("routing", ["p2c", "slo"])
def test_cluster_simulation_serves_every_request_on_one_clock(routing):
    from aptray.sim.cluster import simulate_cluster
    from aptray.sim.outcomes import SimRequest
    rng = random.Random(1)
    reqs = [SimRequest(f"r{i}", i * 0.05, rng.randint(20, 600), rng.randint(5, 60), 0.25, 0.1) for i in range(60)]
    run = simulate_cluster(_sim_config(), reqs, 3, routing, seed=0)
    again = simulate_cluster(_sim_config(), reqs, 3, routing, seed=0)
    assert [o.status for o in run.outcomes] == ["finished"] * 60
    assert [len(o.token_times) for o in run.outcomes] == [r.output_len for r in reqs]
    assert [o.token_times for o in run.outcomes] == [o.token_times for o in again.outcomes]  # deterministic
    assert sum(p["admitted"] for p in run.per_replica) == 60 and min(p["admitted"] for p in run.per_replica) > 5
    assert sum(run.routed.values()) == 60
    assert all(o.token_times[0] >= o.arrival_time for o in run.outcomes)
    # distinct requests share no prompt content: the prefix cache finds nothing to reuse
    assert run.scheduler_stats.get("prefix_queried_tokens", 0) > 0
    assert run.scheduler_stats.get("prefix_hit_tokens", 0) == 0


def _conversations(n: int, turns: int = 3, think: float = 0.5) -> list:
    """n conversations of `turns` turns: each turn resends the last prompt, its 20-token reply and 50
    new tokens, think seconds after the last turn ends."""
    from aptray.sim.outcomes import SimRequest
    reqs = []
    for c in range(n):
        prompt, after = 100, None
        for k in range(turns):
            reqs.append(SimRequest(f"c{c}-t{k}", 0.3 * c, prompt, 20, 1.0, 0.5, content_key=f"conv-{c}", after=after,
                                   think_time=think))
            prompt, after = prompt + 20 + 50, f"c{c}-t{k}"
    return reqs


@pytest.mark.parametrize("routing", ["p2c", "slo"])
def test_cluster_simulation_replays_conversations_as_a_closed_loop(routing):
    """A follow-up comes think_time after its turn ends and resends its prompt and reply: on the
    replica that served the turn it hits them. aptray's router sends it there (the replica reports
    the conversation's prefix); p2c finds it there only by chance."""
    from aptray.sim.cluster import simulate_cluster
    reqs = _conversations(12)
    run = simulate_cluster(_sim_config(), reqs, 3, routing, seed=0)
    by = {o.request_id: o for o in run.outcomes}
    assert [o.status for o in run.outcomes] == ["finished"] * len(reqs)
    for r in reqs:
        if r.after is not None:
            assert by[r.request_id].arrival_time >= by[r.after].token_times[-1] + r.think_time - 1e-9
    hits = run.scheduler_stats.get("prefix_hit_tokens", 0)
    turns_after_the_first = sum(r.after is not None for r in reqs)
    if routing == "slo":  # every follow-up on its conversation's replica: its whole last prompt and reply hit
        assert run.routed.get("prefix", 0) == turns_after_the_first
        assert hits >= sum(16 * ((r.prompt_len - 50) // 16) for r in reqs if r.after is not None)
    else:
        assert "prefix" not in run.routed and hits < 0.7 * sum(r.prompt_len - 50 for r in reqs if r.after is not None)


def test_cluster_simulation_sheds_what_no_replica_can_meet():
    from aptray.sim.cluster import SHED, simulate_cluster
    from aptray.sim.outcomes import SimRequest
    warm = [SimRequest(f"w{i}", 0.0, 300, 50, 10.0, 10.0) for i in range(4)]  # the estimator learns step costs
    burst = [SimRequest(f"r{i}", 2.0, 1000, 20, 0.25, 0.1) for i in range(40)]
    run = simulate_cluster(_sim_config(), warm + burst, 2, "slo", shed_unmeetable=True)
    shed = [o for o in run.outcomes if o.status == "rejected"]
    assert run.routed[SHED] == len(shed) > 0 and all("shed" in o.error for o in shed)
    assert all(o.status == "finished" for o in run.outcomes if o not in shed)


def test_router_parses_each_snapshot_once_and_again_when_it_changes():
    """The router ranks every request against the same snapshots until replicas report again."""
    from aptray.serve.routing_policy import ParsedLoads
    parsed = ParsedLoads()
    a, b = load(queued=1).to_stats(), load(queued=2).to_stats()
    first = parsed.of({"a": a, "b": b})
    assert first["a"].queued == 1 and first["b"].queued == 2
    again = parsed.of({"a": a, "b": b})
    assert again["a"] is first["a"] and again["b"] is first["b"]  # the same dicts: not parsed again
    assert parsed.of({"a": {**a, "queued": 5}})["a"].queued == 5  # a new snapshot
    a["queued"], a["taken_at"] = 7, a["taken_at"] + 1  # the same dict changed in place, with a new time
    assert parsed.of({"a": a})["a"].queued == 7
    assert parsed.of({"a": {"taken_at": float("nan")}, "b": None}) == {"a": None, "b": None}  # malformed
    parsed.forget_others(["b"])
    assert set(parsed._parsed) == {"b"}
