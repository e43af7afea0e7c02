"""The results page's machinery (loadgen.make_results and its parts), in small: docs/RESULTS.md is what
the code renders from the committed JSONs, and the simulated, routing, CPU and multi-turn chat parts
run end to end on a few requests (the pipeline part's own test is in tests/test_sim_pipeline.py)."""
import glob
import os
import shutil

import pytest

from loadgen import make_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_page_is_what_the_committed_results_render(tmp_path, monkeypatch):
    out = tmp_path / "results"
    out.mkdir()
    for path in glob.glob(os.path.join(REPO, "docs", "results", "*.json")) + [
            os.path.join(REPO, "docs", "results", "routing.md")]:
        shutil.copy(path, out)
    shutil.copytree(os.path.join(REPO, "docs", "results", "gpu"), out / "gpu")  # the GPU check's section
    monkeypatch.setattr(make_results, "OUT_DIR", str(out))
    monkeypatch.setattr(make_results, "DOC", str(tmp_path / "RESULTS.md"))
    make_results.main(parts=())
    with open(os.path.join(REPO, "docs", "RESULTS.md")) as committed:
        assert (tmp_path / "RESULTS.md").read_text() == committed.read()


def test_the_simulated_part_runs_end_to_end(tmp_path):
    from loadgen import results_sim
    setup, policies = results_sim.SETUPS[0], list(results_sim.POLICIES)[:2]
    rows = results_sim.run_all([setup], policies, 12, 1.0, 0.5, 1)
    assert [(r["setup"], r["policy"]) for r in rows] == [(setup.name, p) for p in policies]
    assert all(r["effective_throughput_rps"] > 0 for r in rows)
    assert setup.name in "\n".join(make_results.sim_tables(rows, str(tmp_path)))


def test_the_routing_part_runs_end_to_end():
    from loadgen import results_routing
    rows = results_routing.run_all([2], ["p2c", "slo"], 10, 4.0, 0.5, "apt", 1)
    assert [(r["replicas"], r["router"]) for r in rows] == [(2, "p2c"), (2, "slo")]
    assert all(r["effective_throughput_rps"] > 0 for r in rows)
    assert "| 2 |" in "\n".join(results_routing.sim_table(rows))


def test_the_cpu_part_runs_end_to_end(tmp_path):
    from loadgen import results_cpu
    setup = results_cpu.CpuSetup(context=512, num_blocks=64)  # every policy: the tables compare them
    result = results_cpu.run(["sharegpt"], [1.0], rates_by_dataset={"sharegpt": [1.0]}, num_requests=6, workers=1,
                             setup=setup, log=lambda _: None)
    assert {r["policy"] for r in result["runs"]} == set(setup.policies)
    assert all(set(r["attainment_by_slo"]) == {"ttft", "tbt"} for r in result["runs"])
    assert "sharegpt" in "\n".join(make_results.cpu_tables(result, str(tmp_path)))


def test_the_chat_parts_run_end_to_end_with_and_without_prefix_caching(tmp_path):
    import dataclasses

    from loadgen import results_chat, results_cpu, results_sim
    from loadgen.conversations import MULTITURN
    policies = results_chat.with_and_without({k: results_cpu.POLICIES[k] for k in ("fcfs", "apt-hybrid")})
    setup = dataclasses.replace(results_chat.CPU_SETUP, context=512, num_blocks=64, policies=policies)
    cpu = results_cpu.run([MULTITURN], [1.0], rates_by_dataset={MULTITURN: [1.0]}, num_requests=8, workers=1,
                          setup=setup, log=lambda _: None)
    assert {r["policy"] for r in cpu["runs"]} == set(policies)
    cached = [r for r in cpu["runs"] if r["policy"].endswith(results_chat.PREFIX)]
    assert cached and all(r["prefix_cache"]["hit_rate_tokens"] > 0 for r in cached)  # follow-ups hit
    for off in (r for r in cpu["runs"] if not r["policy"].endswith(results_chat.PREFIX)):
        on = next(r for r in cpu["runs"] if r["policy"] == off["policy"] + results_chat.PREFIX)
        # in lockstep the pair shares a process: each engine's own CPU time, within the pair's
        assert off["lockstep"] == on["lockstep"] and off["cpu_s"] == on["cpu_s"]
        assert 0 < off["engine_cpu_s"] and 0 < on["engine_cpu_s"] and off["engine_cpu_s"] + on["engine_cpu_s"] <= on["cpu_s"]
    table = "\n".join(results_chat.cpu_tables(cpu, str(tmp_path)))
    assert "| fcfs | " in table and "| apt-hybrid+prefix | " in table

    sim_setup = results_chat.SIM_SETUPS[0]
    labels = ("apt-kv", "apt-kv+prefix", "apt-hybrid", "apt-hybrid+prefix")
    sim = [results_sim.run_policy((sim_setup, label, 24, 1.0, 0.5, results_chat.SIM_POLICIES)) for label in labels]
    assert all(r["effective_throughput_rps"] > 0 for r in sim)
    table = "\n".join(results_chat.sim_tables(sim, str(tmp_path)))
    assert f"| {sim_setup.name} | apt-hybrid | " in table and "apt with hybrid prefix caching over apt with KV-only" in table


def test_the_pool_benchmark_compares_each_policy_with_and_without_caching_on_the_same_grid():
    from loadgen.bench_chat_pool import summary_rows, table

    def run(policy, rate, attainment, hits=None):
        return {"policy": policy, "rate": rate, "attainment": attainment, "ttft_s": {"p50": rate / 100},
                **({"prefix_cache": {"hit_rate_tokens": hits}} if hits is not None else {})}
    runs = [run("fcfs", 1.0, 1.0), run("fcfs", 2.0, 0.8), run("fcfs+prefix", 1.0, 1.0, 0.9),
            run("fcfs+prefix", 2.0, 0.95, 0.5)]
    (row,) = summary_rows(192, {"runs": runs})
    assert row["effective_off_rps"] == 1.5 and row["effective_on_rps"] == 2.0  # 90% crossed halfway; never
    assert row["at_rate"] == 1.0 and row["hit_rate_tokens"] == {1.0: 0.9, 2.0: 0.5}
    # with caching it kept 90% at every rate: a lower bound, and so is the ratio
    assert table([row])[-1] == "| 192 | fcfs | 1.50 | >= 2.00 | >= 1.33x | 10 / 10 | 0.90 / 0.50 |"


def test_the_chat_table_marks_a_throughput_kept_at_every_rate_as_a_lower_bound(tmp_path):
    """A policy that keeps 90% at every rate tried has an effective throughput of at least the highest
    rate: the chat part's table says ">=", and leaves it out of the span of ratios across policies."""
    from loadgen import results_chat

    def run(policy, rate, attainment):
        return {"dataset": "chat", "policy": policy, "rate": rate, "attainment": attainment, "preemptions": 0,
                "ttft_slo": 0.5, "tbt_slo": 0.01, "ttft_s": {"p50": 0.01}, "cpu_s": 1.0,
                "prefix_cache": {"hit_rate_tokens": 0.8} if policy.endswith(results_chat.PREFIX) else None}
    curves = {"fcfs": (1.0, 0.8, 0.5), "fcfs+prefix": (1.0, 1.0, 0.95), "vllm": (1.0, 0.8, 0.5),
              "vllm+prefix": (1.0, 1.0, 0.8), "sarathi": (1.0, 0.8, 0.5), "sarathi+prefix": (1.0, 0.8, 0.95)}
    runs = [run(p, rate, a) for p, att in curves.items() for rate, a in zip((1.0, 2.0, 3.0), att)]
    for r in runs:  # vllm's pair ran in lockstep, and recorded each engine's CPU time; sarathi's did not
        if r["policy"].startswith(("vllm", "sarathi")):
            r["lockstep"] = [r["policy"].removesuffix(results_chat.PREFIX), r["policy"].removesuffix(results_chat.PREFIX) + results_chat.PREFIX]
        if r["policy"].startswith("vllm"):
            r["engine_cpu_s"] = 0.25 if r["policy"].endswith(results_chat.PREFIX) else 0.5
    lines = results_chat.cpu_tables({"runs": runs}, str(tmp_path))
    fcfs = next(line for line in lines if line.startswith("| fcfs |"))
    vllm = next(line for line in lines if line.startswith("| vllm |"))
    sarathi = next(line for line in lines if line.startswith("| sarathi |"))
    assert fcfs == "| fcfs | 1.50 | >= 3.00 | >= 2.00x | 1 | 10 | 10 | 1.00x | 80% | 1.00x |"  # never missed with caching
    assert vllm == "| vllm | 1.50 | 2.50 | 1.67x | 1 | 10 | 10 | 1.00x | 80% | 0.50x |"
    # dipped below 90% and came back at the highest rate: it crossed where it first dipped; a pair in
    # lockstep without each engine's own CPU time has none to compare
    assert sarathi == "| sarathi | 1.50 | 1.50 | 1.00x | 1 | 10 | 10 | 1.00x | 80% | - |"
    span = next(line for line in lines if line.startswith("With prefix caching over without"))
    assert "throughput 1.00-1.67x" in span and "leaves out fcfs+prefix" in span


def test_the_served_routing_benchmark_gives_every_router_every_chunk_side_by_side():
    from loadgen.bench_routing import chunked, schedule, slo_trace
    from loadgen.traces import rescale
    trace = rescale(slo_trace(10, 0.03, 0.003), 1.0, 4.0)
    parts = chunked(trace, 3)
    assert [r.request_id for p in parts for r in p] == [r.request_id for r in trace]
    assert all(p[0].arrived_at == 0 and [r.arrived_at for r in p] == sorted(r.arrived_at for r in p) for p in parts)
    gaps = [b.arrived_at - a.arrived_at for p in parts for a, b in zip(p, p[1:])]
    assert gaps == [b.arrived_at - a.arrived_at for a, b in zip(trace, trace[1:]) if a.request_id not in
                    {p[-1].request_id for p in parts}]
    routers = ("p2c", "slo", "slo-eq")
    assert schedule(routers, 0, False, 1) == [((n,), 0) for n in routers + routers[::-1]]
    assert schedule(routers, 1, False, 1) == [((n,), 0) for n in routers[::-1] + routers]
    steps = schedule(routers, 0, False, 4)
    for c in range(4):  # each chunk twice per router, and each chunk's turns back to back within a pass
        assert sorted(n for (n,), k in steps if k == c) == sorted(routers * 2)
    assert [k for _, k in steps] == [c for _ in range(2) for c in range(4) for _ in routers]
    for chunks in (1, 2, 3, 4):  # a chunk's second pass runs the routers in the reverse of its first order
        for k in (0, 1):
            steps = schedule(routers, k, False, chunks)
            for c in range(chunks):
                order = [n for (n,), j in steps if j == c]
                assert order[len(routers):] == order[:len(routers)][::-1]
    assert schedule(routers, 0, True, 2) == [(routers, 0), (routers, 1)] * 2


def test_the_cpu_units_are_medians_after_a_discarded_warmup(tmp_path):
    """decode_step_time and prefill_time run the real engine; the executor here reports scripted step
    times per measurement: a slow first one (the warm-up) must not count, and the unit is the median
    of the rest."""
    from aptray.executor.local import LocalExecutor
    from aptray.model.factory import make_tiny_model
    from loadgen import results_cpu
    tiny_opt_dir = make_tiny_model(str(tmp_path / "opt"), "opt", hidden_size=32, num_layers=2, num_heads=2,
                                   max_positions=256)

    def scripted(per_call):
        calls = []

        def make(config):
            class Scripted(LocalExecutor):
                def execute(self, plan):
                    result = super().execute(plan)
                    result.step_time = per_call[min(len(calls) - 1, len(per_call) - 1)]
                    return result
            calls.append(config)
            return Scripted(config)
        return make

    # the decode unit builds one engine per measurement: 9.0 (warm-up), then 3, 1, 2, 5, 4
    step = results_cpu.decode_step_time(tiny_opt_dir, scripted([9.0, 3.0, 1.0, 2.0, 5.0, 4.0]), context=256)
    assert step == 3.0

    times = iter([9.0, 3.0, 1.0, 2.0, 5.0, 4.0])  # the prefill unit: one engine, a prefill per measurement

    class PrefillScripted(LocalExecutor):
        def execute(self, plan):
            result = super().execute(plan)
            if any(not s.is_decode for s in plan.seqs):
                result.step_time = next(times)
            return result
    assert results_cpu.prefill_time(tiny_opt_dir, PrefillScripted, context=256) == 3.0
    assert next(times, None) is None  # six prefills: the warm-up and five


def test_the_served_routing_page_pairs_each_routers_chunks_with_p2cs_and_gives_the_interval():
    from loadgen.results_routing import paired_difference, paired_tables, targets
    # differences 0.1, -0.1, 0.3: mean 0.1, standard error 0.2 / sqrt(3), t(0.975, 2 df) = 4.303
    mean, low, high = paired_difference([0.5, 0.7, 0.9], [0.4, 0.8, 0.6])
    assert mean == pytest.approx(0.1)
    assert high - mean == pytest.approx(mean - low) == pytest.approx(4.3027 * 0.2 / 3 ** 0.5, rel=1e-4)
    assert paired_difference([0.5], [0.4]) is None and paired_difference([0.5, 0.6], [0.4]) is None
    assert paired_difference([0.5, 0.6, 0.7], [0.4, 0.5]) is None  # unequal replays: no pairs to take

    def rate(slo, p2c):
        return {"slo": {"attainment": sum(slo) / len(slo), "passes": slo},
                "p2c": {"attainment": sum(p2c) / len(p2c), "passes": p2c}}
    cpu = {"routers": {"p2c": {}, "slo": {}}, "runs": {"2": {"rates": {
        "1.0": rate([1.0, 0.5, 1.0], [1.0, 1.0, 1.0]), "2.0": rate([0.9, 1.0, 1.0], [0.8, 0.9, 1.0])}}}}
    table = "\n".join(paired_tables(cpu))
    assert "the 3 replays of each rate" in table
    assert "| slo | -0.167 (-0.884 to +0.550) | +0.067 (-0.077 to +0.210) |" in table
    served = [line for line in targets(None, cpu) if "served" in line]
    assert served == ["- served, 2 replicas: slo attainment >= p2c at 1 of 2 rates (target: every rate at 2 replicas: "
                      "missed); lower at 1 req/s (0.833 against 1.000; paired difference -0.167, 95% interval -0.884 "
                      "to +0.550)"]
    cpu["runs"]["3"] = cpu["runs"]["2"]  # the target is for 2 replicas: other counts get no verdict
    assert [line for line in targets(None, cpu) if "served, 3" in line][0].startswith(
        "- served, 3 replicas: slo attainment >= p2c at 1 of 2 rates; lower at 1 req/s")
    del cpu["runs"]["3"]
    # passes that do not pair (a run before chunked replays): no interval is made up
    cpu["runs"]["2"]["rates"]["1.0"]["slo"]["passes"] = [0.8333]
    cpu["runs"]["2"]["rates"]["2.0"]["slo"]["passes"] = [0.9667]
    assert paired_tables(cpu) == []
    assert "paired" not in "\n".join(targets(None, cpu))
