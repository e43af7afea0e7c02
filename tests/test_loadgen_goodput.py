"""loadgen's report of a run: vLLM-style goodput (--goodput ttft:MS tbt:MS), attainment per SLO kind,
misses for failed, rejected and tokenless requests; a trace's sample told as it is (--num-requests,
vLLM's length filter, requests over the context reported apart)."""
import json

import pytest

from loadgen.arguments import build_parser
from loadgen.cli import main
from loadgen.run_setup import trace_sample
from loadgen.metrics import RequestRecord, goodput_report, parse_goodput, summarize
from loadgen.traces import TraceRequest, write_trace


def rec(ttft=0.1, gaps=(), status="finished", prompt_len=10, output_len=None, tokens=True):
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestRecord.from_token_times("r", 0.0, prompt_len, output_len or len(times), 0.5, 0.2,
                                          times if tokens else [], status)


def test_goodput_slos_parse_as_vllm_writes_them():
    assert parse_goodput(["ttft:250", "tbt:100", "tpot:50", "e2el:2000"]) == \
        {"ttft": 0.25, "tbt": 0.1, "tpot": 0.05, "e2el": 2.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"], ["tbt:0"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_attainment_per_slo_kind_counts_every_miss():
    records = [rec(gaps=[0.05] * 5),                     # meets both
               rec(ttft=0.4, gaps=[0.05] * 5),           # TTFT over 300 ms, gaps fine
               rec(gaps=[0.05, 0.3, 0.3]),               # TBT P99 over 200 ms
               rec(gaps=[0.05] * 5, status="failed"),    # its tokens were in time, but it failed
               rec(status="rejected", tokens=False),
               rec(tokens=False)]                        # "finished" with no token
    g = goodput_report(records, parse_goodput(["ttft:300", "tbt:200"]), duration=2.0)
    assert g["attainment"] == {"ttft": 2 / 6, "tbt": 2 / 6, "all": 1 / 6}
    assert g["request_goodput_rps"] == 0.5 and g["slos_ms"] == {"ttft": 300.0, "tbt": 200.0}
    s = summarize(records, 2.0)
    # each request's own SLOs (TTFT 500 ms, TBT 200 ms) kind by kind
    assert s["attainment_by_slo"] == {"ttft": 3 / 6, "tbt": 2 / 6}
    assert s["attainment"] == 2 / 6 and "goodput" not in s


def test_tpot_and_e2el_as_vllm_defines_them():
    r = rec(ttft=0.1, gaps=[0.02, 0.04])  # 3 tokens: (0.16 - 0.1) / 2
    assert r.tpot == pytest.approx(0.03)
    assert r.meets("tpot", 0.03) and not r.meets("tpot", 0.029)
    assert r.meets("e2el", 0.16) and not r.meets("e2el", 0.15)


def test_requests_over_the_context_are_reported_apart():
    records = [rec(gaps=[0.05]), rec(gaps=[0.05]), rec(gaps=[0.05]),
               rec(prompt_len=600, output_len=10, status="rejected", tokens=False)]
    o = summarize(records, 1.0, context=512)["over_context"]
    assert o == {"context": 512, "requests": 1, "rejected_for_length": 1, "attainment_within_context": 1.0}


@pytest.fixture
def trace_file(tmp_path):
    # arrivals out of file order; lengths: short output, prompt over half of 512, over 512, and fine ones
    rows = [TraceRequest("a", 0.3, 100, 50), TraceRequest("b", 0.1, 100, 2), TraceRequest("c", 0.2, 300, 10),
            TraceRequest("d", 0.0, 500, 100), TraceRequest("e", 0.4, 50, 50), TraceRequest("f", 0.5, 60, 60)]
    path = str(tmp_path / "t.csv")
    write_trace(path, rows)
    return path


def sample(path, *extra):
    args = build_parser().parse_args(["trace", "--trace", path, "--context", "512", "--out", "x", *extra])
    from loadgen.traces import read_trace
    return trace_sample(args, read_trace(path))


def test_num_requests_applies_to_a_trace_in_arrival_order(trace_file, capsys):
    assert [r.request_id for r in sample(trace_file)] == ["d", "b", "c", "a", "e", "f"]
    assert [r.request_id for r in sample(trace_file, "--num-requests", "3")] == ["d", "b", "c"]
    err = capsys.readouterr().err
    assert "6 of 6 rows; 1 over the 512-token context" in err and "3 of 6 rows; 1 over" in err


def test_vllms_length_filter_on_a_trace(trace_file, capsys):
    kept = sample(trace_file, "--length-filter", "vllm", "--num-requests", "2")
    assert [r.request_id for r in kept] == ["a", "e"]  # d (over 512), b (2 output tokens), c (prompt > 256) dropped
    assert "2 of 6 rows (3 dropped by vLLM's length filter)" in capsys.readouterr().err


def test_run_reports_goodput_and_rejected_for_length(tmp_path, capsys):
    rows = [TraceRequest(f"r{i}", 0.05 * i, 200, 20) for i in range(6)] + [TraceRequest("long", 0.4, 2100, 10)]
    write_trace(str(tmp_path / "t.csv"), rows)
    out = tmp_path / "run.json"
    main(["run", "--sim", "--trace", str(tmp_path / "t.csv"), "--policy", "vllm", "--ttft-slo", "0.5",
          "--tbt-slo", "0.2", "--goodput", "ttft:500", "tbt:200", "--out", str(out)])
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())["summary"]
    assert summary["statuses"] == {"finished": 6, "rejected": 1}
    assert summary["over_context"]["rejected_for_length"] == 1
    assert summary["goodput"]["attainment"]["all"] == summary["attainment"] == pytest.approx(6 / 7)
    assert "Request goodput (req/s):" in printed and "1 rejected for length" in printed


def test_sweep_reports_effective_throughput_per_seed_with_its_spread(tmp_path):
    rows = [TraceRequest(f"r{i}", 0.1 * i, 100 + 10 * i, 30) for i in range(20)]
    write_trace(str(tmp_path / "t.csv"), rows)
    main(["sweep", "--sim", "--trace", str(tmp_path / "t.csv"), "--policies", "vllm", "--rates", "2,40",
          "--seeds", "0,1,2", "--workers", "1", "--ttft-slo", "0.5", "--tbt-slo", "0.2",
          "--out-dir", str(tmp_path / "sweep")])
    res = json.loads((tmp_path / "sweep" / "results.json").read_text())["policies"]["vllm"]
    per_seed = list(res["effective_per_seed"].values())
    assert list(res["effective_per_seed"]) == ["0", "1", "2"] and all(v >= 0 for v in per_seed)
    assert res["effective_mean_sd"][0] == pytest.approx(sum(per_seed) / 3)
