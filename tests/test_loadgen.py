"""loadgen: arrivals, SLO metrics, bisection, datasets, traces, and the in-process client."""
import gc
import json
import math

import numpy as np
import pytest

from loadgen.arrivals import arrival_times, gamma_intervals
from loadgen.metrics import RequestRecord, attainment, goodput, summarize
from loadgen.sweep import crossing_rate, effective_throughput
from loadgen.traces import TraceRequest, make_trace, read_trace, rescale, write_trace


@pytest.fixture(scope="module")
def tokenizer():
    from aptray.model.factory import make_tokenizer
    return make_tokenizer(512)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_arrivals_mean_and_cv(cv):
    gaps = gamma_intervals(rate=5.0, cv=cv, n=20_000, seed=7)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert np.array_equal(gaps, gamma_intervals(5.0, cv, 20_000, seed=7))  # seeded


def test_arrival_times_start_at_zero_and_increase():
    t = arrival_times(2.0, 1.0, 100, seed=1)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)


def rec(ttft=0.1, gaps=(), status="finished", ttft_slo=0.5, tbt_slo=0.2, arrived=0.0):
    times = [arrived + ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestRecord.from_token_times("r", arrived, 10, len(times), ttft_slo, tbt_slo,
                                          times if status == "finished" else [], status)


def test_attainment_ttft_and_p99_rule():
    ok = rec(gaps=[0.05] * 199)
    late = rec(ttft=0.6, gaps=[0.05] * 199)
    # 200 gaps: P99 = sorted[197] + 0.01 * (sorted[198] - sorted[197]); two slow gaps sit at 198, 199
    two_slow = rec(gaps=[0.05] * 198 + [1.0, 1.0])
    three_slow = rec(gaps=[0.05] * 197 + [1.0] * 3)
    first_gap_only = rec(ttft=0.45, gaps=[0.05] * 10)  # TTFT close to its SLO: not a gap
    assert ok.attained and not late.attained
    assert two_slow.tbt_p99 == pytest.approx(0.05 + 0.01 * 0.95)
    assert two_slow.attained
    assert three_slow.tbt_p99 == pytest.approx(1.0) and not three_slow.attained
    assert first_gap_only.attained
    single = rec(gaps=[])  # one token: no gaps, only TTFT counts
    assert single.attained and single.tbt_p99 == 0.0
    tolerant = rec(gaps=[0.05] * 499 + [1.0])  # one slow gap in 500: P99 stays low
    assert tolerant.attained


def test_misses_count_in_attainment_and_goodput():
    records = [rec(), rec(), rec(status="rejected"), rec(status="aborted"), rec(status="failed"),
               rec(gaps=[0.05], ttft=2.0)]
    assert attainment(records) == pytest.approx(2 / 6)
    assert goodput(records, duration=4.0) == pytest.approx(0.5)
    s = summarize(records, duration=4.0)
    assert s["statuses"] == {"finished": 3, "rejected": 1, "aborted": 1, "failed": 1}
    assert s["attainment"] == pytest.approx(1 / 3)
    assert attainment([]) == 0.0


def test_bisection_finds_threshold_of_monotone_curve():
    knee, calls = 3.7, []

    def attain(rate):
        calls.append(rate)
        return 1.0 / (1.0 + math.exp(4.0 * (rate - knee)))

    target = knee - math.log(9.0) / 4.0  # attain(target) == 0.9
    found = effective_throughput(attain, lo=0.5, hi=2.0, threshold=0.9, rel_tol=0.01)
    assert len(calls) == len(set(calls)) == len(found.evaluated) <= 20  # no rate probed twice
    assert found.evaluated[found.rate] >= 0.9
    assert found.rate == pytest.approx(target, rel=0.011)
    strict = effective_throughput(attain, 0.5, 2.0, threshold=0.99, rel_tol=0.01)
    assert strict.rate < found.rate
    assert effective_throughput(lambda r: 0.0, 1.0, 2.0).rate == 0.0


def test_crossing_rate_interpolates():
    curve = {1.0: 1.0, 2.0: 0.95, 3.0: 0.85, 4.0: 0.2}
    assert crossing_rate(curve, 0.9) == pytest.approx(2.5)
    assert crossing_rate({1.0: 0.5}, 0.9) == 0.0
    assert crossing_rate({1.0: 0.95, 2.0: 0.92}, 0.9) == 2.0


def test_csv_and_jsonl_trace_round_trip(tmp_path):
    trace = [TraceRequest(f"req-{i}", 0.125 * i + 1 / 3, 10 + i, 5 + i, 0.25 if i % 2 else None, 0.1)
             for i in range(20)]
    for name in ("t.csv", "t.jsonl"):
        write_trace(str(tmp_path / name), trace)
        assert read_trace(str(tmp_path / name)) == trace
    vidur = tmp_path / "vidur.csv"
    vidur.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,100,20\n0.0,30,7\n")
    got = read_trace(str(vidur))
    assert [(r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens) for r in got] == [(0.0, 30, 7), (0.5, 100, 20)]
    moved = rescale(trace, rate=10.0, seed=3)
    assert [r.num_prefill_tokens for r in moved] == [r.num_prefill_tokens for r in trace]
    assert moved[-1].arrived_at != trace[-1].arrived_at


@pytest.mark.parametrize("name", ["sharegpt", "humaneval", "synthetic-longprompt"])
def test_datasets_within_context(name, tokenizer):
    from loadgen.datasets import load_samples
    context = 512
    samples = load_samples(name, tokenizer, 200, context=context, seed=0)
    assert len(samples) == 200
    for s in samples:
        assert s.prompt and 1 <= s.prompt_len < context and s.output_len >= 1
        assert s.prompt_len + s.output_len <= context
        if name != "synthetic-longprompt":  # vLLM's filter: dropped, not cut
            assert s.prompt_len <= context // 2 and min(s.prompt_len, s.output_len) >= 4
    plens = [len(tokenizer(s.prompt, add_special_tokens=False)["input_ids"]) for s in samples[:20]]
    assert all(abs(a - s.prompt_len) <= 2 for a, s in zip(plens, samples[:20]))  # (cut) prompts re-tokenise closely
    trace = make_trace(samples, rate=2.0, seed=0)
    assert len({r.request_id for r in trace}) == 200


def test_dataset_sampling_is_seeded(tokenizer):
    from loadgen.datasets import load_samples
    a = load_samples("humaneval", tokenizer, 50, context=2048, seed=1)
    assert a == load_samples("humaneval", tokenizer, 50, context=2048, seed=1)
    assert a != load_samples("humaneval", tokenizer, 50, context=2048, seed=2)
    assert len(load_samples("humaneval", tokenizer, 300, context=2048)) == 300  # more than its 164 problems


def test_in_process_client_on_tiny_model(tmp_path):
    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.model.factory import make_tiny_model
    from loadgen.clients import InProcessEngineClient

    path = make_tiny_model(str(tmp_path / "opt"), "opt", hidden_size=32, num_layers=2, num_heads=2, max_positions=128)

    def factory():
        config = EngineConfig(model=path, num_cache_blocks=64, block_size=8)
        return Engine(config, LocalExecutor(config))

    trace = [TraceRequest(f"r{i}", 0.02 * i, 8 + i, 4 + i % 3) for i in range(6)]
    trace.append(TraceRequest("too-long", 0.05, 200, 4))  # over the 128-token context: rejected
    result = InProcessEngineClient(factory, ttft_slo=5.0, tbt_slo=5.0).run(trace)
    by_id = {r.request_id: r for r in result.records}
    assert by_id["too-long"].status == "rejected" and not by_id["too-long"].attained
    for r in trace[:6]:
        got = by_id[r.request_id]
        assert got.status == "finished" and got.num_tokens == r.num_decode_tokens
        assert len(got.token_gaps) == r.num_decode_tokens - 1 and got.ttft > 0
    assert attainment(result.records) == pytest.approx(6 / 7)


def test_cpu_clock_replay_skips_idle_time(tmp_path):
    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.model.factory import make_tiny_model
    from loadgen.calibrate import replay_on_cpu_clock

    path = make_tiny_model(str(tmp_path / "opt"), "opt", hidden_size=32, num_layers=2, num_heads=2, max_positions=128)

    def factory(clock):
        config = EngineConfig(model=path, num_cache_blocks=64, block_size=8)
        return Engine(config, LocalExecutor(config), clock=clock)

    # arrivals 100 s apart: a wall-clock replay would sleep for minutes; the CPU clock jumps over the gaps
    trace = [TraceRequest(f"r{i}", 100.0 * i, 8 + i, 3) for i in range(3)]
    records, duration = replay_on_cpu_clock(factory, trace, ttft_slo=5.0, tbt_slo=5.0)
    assert [r.status for r in records] == ["finished"] * 3 and 200.0 < duration < 210.0
    for r in records:
        assert r.num_tokens == 3 and 0 < r.ttft < 5.0 and r.attained


def test_remote_clients_say_when_no_server_is_there():
    """A run against an address with no server is an error naming it, not a run of lost requests."""
    from aptray.worker.shard import free_port
    from loadgen.clients import GrpcStreamClient, HttpStreamClient
    from loadgen.traces import TraceRequest
    trace = [TraceRequest("r0", 0.0, 4, 2)]
    port = free_port()
    with pytest.raises(ConnectionError, match=f"no HTTP server at 127.0.0.1:{port}"):
        HttpStreamClient(f"http://127.0.0.1:{port}").run(trace)
    grpc_client = GrpcStreamClient(f"127.0.0.1:{port}")
    grpc_client.connect_timeout = 1.0
    with pytest.raises(ConnectionError, match=f"no gRPC server at 127.0.0.1:{port}"):
        grpc_client.run(trace)


def _cpu_run(dataset, cv, policy, rate, attainment):
    return {"dataset": dataset, "cv": cv, "policy": policy, "rate": rate, "attainment": attainment,
            "preemptions": 1, "ttft_slo": 0.08, "tbt_slo": 0.03, "ttft_s": {"p90": 0.5 / attainment}}


def test_results_tables_ratio_and_explain_rows_no_policy_meets(tmp_path):
    from loadgen.make_results import cpu_tables
    met = {"fcfs": (0.95, 0.5), "sarathi": (0.95, 0.6), "apt-kv": (1.0, 0.95), "apt-hybrid": (1.0, 0.95)}
    runs = [_cpu_run("sharegpt", 1.0, p, r, a) for p, att in met.items() for r, a in zip((1.0, 2.0), att)]
    runs += [_cpu_run("sharegpt", 4.0, p, r, a) for p in met for r, a in ((0.5, 0.5), (1.0, 0.25))]
    lines = cpu_tables({"runs": runs, "num_blocks": 48}, str(tmp_path))
    row = next(line for line in lines if line.startswith("| sharegpt | 1 |"))
    # fcfs crosses 90% at 1 + 0.05 / 0.45 req/s (interpolated), sarathi at 1 + 0.05 / 0.35; apt keeps it at
    # 2, the highest rate tried: its throughput and its ratios are lower bounds
    assert row == "| sharegpt | 1 | 1.1 | 1.1 | >= 2.0 | >= 2.0 | >= 1.80x | >= 1.80x | >= 1.75x | >= 1.75x |"
    assert any(line.startswith("`>=`") for line in lines)
    note = next(line for line in lines if line.startswith("Rows at 0.0"))
    assert "sharegpt CV 4: fcfs 0.38" in note and "TTFT p90 at 0.5 req/s: fcfs 1000 ms" in note
    assert "48 blocks" in note and "CV 1" not in note
    assert (tmp_path / "cpu-sharegpt-cv4.png").exists()


def test_a_ratio_over_a_lower_bound_is_not_given():
    from loadgen.sweep import bounded_ratio
    assert bounded_ratio(3.0, 1.5, False, True) == "-"
    assert bounded_ratio(3.0, 1.5, False, False) == "2.00x"
    assert bounded_ratio(0.0, 1.5, True, False) == "-"  # no policy rate to bound


def test_the_scheduler_benchmark_times_decision_and_update_apart(tmp_path):
    from loadgen import bench_scheduler
    out = tmp_path / "bench.json"
    bench_scheduler.main(["--sizes", "12", "--max-num-seqs", "4", "6", "--iters", "15", "--policies", "apt,fcfs",
                          "--gc", "off", "--out", str(out)])
    assert gc.isenabled()  # the collector was disabled case by case only
    rows = json.loads(out.read_text())["results"]
    assert sorted({(r["policy"], r["cache_mode"], r["max_num_seqs"]) for r in rows}) == [
        ("apt", "hybrid", 4), ("apt", "hybrid", 6), ("apt", "kv", 4), ("apt", "kv", 6), ("fcfs", "kv", 4), ("fcfs", "kv", 6)]
    for r in rows:
        assert r["running_at_end"] == r["max_num_seqs"]
        assert r["update_median_ms"] > 0
        # each iteration's time is its decision's plus its update's, so its median is at least either's
        assert r["iteration_median_ms"] >= max(r["median_ms"], r["update_median_ms"])


def test_bench_tokenize_times_the_sizes_the_limits_allow(tmp_path):
    """The three sizes of serve/limits.py, each encoded and its time recorded (not judged here: timings
    are the bench's to report)."""
    from aptray.serve.limits import TRUNCATED_PROMPT_FACTOR
    from loadgen.bench_tokenize import main

    main(["--out", str(tmp_path), "--repeats", "1"])
    rows = json.loads((tmp_path / "tokenize_costs.json").read_text())["rows"]
    assert [r["size"] for r in rows] == ["longest prompt", "prompt to truncate", "body limit"]
    assert rows[1]["chars"] == TRUNCATED_PROMPT_FACTOR * rows[0]["chars"] and rows[2]["chars"] == 1 << 20
    assert rows[0]["tokens"] < rows[1]["tokens"] < rows[2]["tokens"]
    assert all(r["encode_s"] > 0 for r in rows)
