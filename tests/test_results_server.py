"""The wall-clock server experiment (loadgen.results_server) on a tiny case: one app per policy under its
route prefix, the same requests replayed through HTTP per seed and rate, effective throughput per seed
with its spread, the table and the error-bar plot; a request the server refuses is a miss."""
import pytest

from loadgen import results_server
from loadgen.clients import HttpStreamClient
from loadgen.make_results import server_tables
from loadgen.metrics import summarize
from loadgen.results_cpu import CONTEXT, tiny_opt
from loadgen.traces import TraceRequest


@pytest.fixture(scope="module")
def apps():
    model = tiny_opt()
    url, stop = results_server.start_apps(model, list(results_server.POLICIES), 1.0, 0.5)
    yield model, url
    stop()


def test_a_request_the_server_refuses_is_a_miss(apps):
    _, url = apps
    trace = [TraceRequest("ok", 0.0, 20, 5), TraceRequest("too-long", 0.05, CONTEXT - 10, 50)]
    res = HttpStreamClient(f"{url}/vllm", 5.0, 5.0).run(trace)
    assert [r.status for r in res.records] == ["finished", "failed"]
    s = summarize(res.records, res.duration, context=CONTEXT)
    assert s["attainment"] == 0.5 and s["attainment_by_slo"] == {"ttft": 0.5, "tbt": 0.5}
    assert s["over_context"]["rejected_for_length"] == 1 and s["over_context"]["attainment_within_context"] == 1.0


def test_every_policy_replays_the_same_requests_per_seed_and_rate(apps, tmp_path):
    out = results_server.run("quick", seeds=[0, 1], rates=[1.5, 6], num_requests=5, apps=apps)
    assert len(out["runs"]) == 3 * 2 * 2
    assert {(r["policy"], r["seed"]) for r in out["runs"]} == {(p, s) for p in results_server.POLICIES for s in (0, 1)}
    assert all(r["statuses"] == {"finished": 5} for r in out["runs"])
    for p in results_server.POLICIES:
        e = out["effective"][p]
        assert len(e["per_seed"]) == 2 and e["min"] <= e["mean"] <= e["max"] and e["sd"] >= 0
    assert set(out["ratios"]) == {"apt/fcfs", "apt/vllm"}
    lines = server_tables(out, str(tmp_path))
    assert any(line.startswith("| apt/vllm |") for line in lines)
    assert (tmp_path / "server-sharegpt.png").stat().st_size > 1000
