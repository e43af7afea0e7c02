"""The multi-turn chat workload: turn lengths by vLLM's rule, token streams that each turn extends,
follow-ups that resend the reply the server gave, closed-loop traces (a turn comes think_time after
the one it follows ends) in the simulator, the in-process client and the asyncio replay of the
remote clients, and hit rates in the summaries."""
from __future__ import annotations

import asyncio
import time

import pytest

from aptray.sim.arrivals import Arrivals
from aptray.sim.prompt_ids import SHARED_PREFIX_KEY, follow_up_ids, prompt_ids, stream_ids
from loadgen.clients import conversation_ids, read_prefix_counters, remote_prompt, replay_at_arrivals
from loadgen.conversations import turns_within
from loadgen.samples import Sample
from loadgen.metrics import RequestRecord, summarize
from loadgen.traces import make_trace, read_trace, rescale, write_trace


def chat_samples(shared_prefix=0):
    """Two conversations of 3 and 1 turns (prompt, output), the second starting in between."""
    turns = [("c0", 0, 20, 8), ("c0", 1, 40, 8), ("c1", 0, 12, 5), ("c0", 2, 60, 4)]
    return [Sample("", shared_prefix + p, o, conversation=c, turn=k, shared_prefix=shared_prefix)
            for c, k, p, o in turns]


def test_turns_stop_at_the_first_that_breaks_the_rule():
    # context 100: prompt <= 50, prompt + reply <= 100, first message and replies >= 4 tokens
    assert turns_within([10, 5, 5, 5], [10, 10, 30, 10], 100) == [(10, 10), (25, 10), (40, 30)]
    assert turns_within([10, 5], [10, 3], 100) == [(10, 10)]  # a reply under 4 tokens ends it
    assert turns_within([3, 20], [10, 10], 100) == []
    assert turns_within([10, 11], [10, 10], 100, shared_prefix=20) == [(30, 10)]  # turn 2: 51 > 50


def test_streams_extend_turn_by_turn_and_share_only_the_system_prompt():
    assert stream_ids("k", 50)[:20] == stream_ids("k", 20) and stream_ids("k", 5, start=20) == stream_ids("k", 25)[20:]
    assert stream_ids("a", 16) != stream_ids("b", 16)
    assert all(4 <= t < 100 for t in stream_ids("k", 1000))
    a, b = prompt_ids("c0", 30, shared_prefix=8), prompt_ids("c1", 30, shared_prefix=8)
    assert a[:8] == b[:8] == stream_ids(SHARED_PREFIX_KEY, 8) and a[8:] != b[8:]
    trace = make_trace(chat_samples(8), rate=1.0)
    turns = [conversation_ids(r) for r in trace if r.conversation == "c0"]
    assert turns[1][:len(turns[0])] == turns[0] and turns[2][:len(turns[1])] == turns[1]
    assert remote_prompt(trace[0], "run1-") != remote_prompt(trace[0], "run2-")  # each remote run its own
    assert remote_prompt(trace[0], "run1-")[:8] == remote_prompt(trace[0], "run2-")[:8]  # but one system prompt


def test_a_follow_up_resends_what_was_said_then_its_own_stream():
    stream = stream_ids("c0", 30)
    said = stream[:10] + [7] * 8  # the last prompt, then the reply the server gave
    assert follow_up_ids(stream, said) == said + stream[18:]
    assert follow_up_ids(stream, None) == stream and follow_up_ids(stream, stream + [7]) == stream
    trace = make_trace(chat_samples(), rate=1.0)
    arrivals = Arrivals(trace, at=lambda r: r.arrived_at)
    assert arrivals.is_followed("req-0") and not arrivals.is_followed("req-3")
    arrivals.ended("req-0", 1.0, said)
    assert arrivals.said_before("req-1") == said and arrivals.said_before("req-1") is None  # once
    arrivals.ended("req-1", 2.0)  # refused: no reply to resend
    assert arrivals.said_before("req-3") is None


def test_http_client_names_each_turn_by_its_conversation():
    from aptray.serve.prefix_key import prefix_tag
    from loadgen.clients import HttpStreamClient
    client = HttpStreamClient("http://127.0.0.1:9/app")
    client.salt = "run1-"
    trace = make_trace(chat_samples(), rate=1.0)
    heads = [client._request(r).split(b"\r\n\r\n", 1)[0].decode() for r in trace]
    keys = [next((ln.split(": ", 1)[1] for ln in h.split("\r\n") if ln.startswith("x-aptray-prefix-key:")), None)
            for h in heads]
    assert keys == ["run1-" + r.conversation for r in trace] and all(prefix_tag(k) for k in keys)
    plain = make_trace([Sample("", 20, 4)], rate=1.0)[0]
    assert b"x-aptray-prefix-key" not in client._request(plain)


@pytest.mark.parametrize("with_ids", [True, False])
def test_http_client_reads_token_ids_out_of_the_servers_events(with_ids):
    """The HTTP replay cuts each token event's ids out of its bytes (a ']' or a quote in the text
    does not confuse it); from a server that gives no ids it reads none, and the stream still counts."""
    from aptray.serve.sse import CompletionEvents
    from loadgen.clients import HttpStreamClient
    events = CompletionEvents("r", "m", True, [5, 6] if with_ids else None)
    chunks = [{"text": 'a]"}', "token_ids": [1], "finished": False, "finish_reason": None},
              {"text": "b", "token_ids": [2, 3], "finished": False, "finish_reason": None},
              {"text": "", "token_ids": [4], "finished": True, "finish_reason": "length",
               "usage": {"prompt_tokens": 2, "completion_tokens": 4}}]
    body = (events.render(chunks[:2]) + events.render(chunks[2:]) + "data: [DONE]\n\n").encode()
    raw = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:70], body[70:])) + b"0\r\n\r\n"

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        times, ids = [], []
        return await HttpStreamClient._events(reader, times, ids), len(times), ids
    assert asyncio.run(read()) == (("finished", ""), 3, [1, 2, 3, 4] if with_ids else [])


def test_chat_trace_is_a_closed_loop_per_conversation(tmp_path):
    trace = make_trace(chat_samples(), rate=2.0, seed=3, think_time=0.5)
    by = {r.request_id: r for r in trace}
    assert [r.after for r in trace] == [None, "req-0", None, "req-1"]
    assert all(r.think_time > 0 for r in trace if r.after) and by["req-0"].think_time is None
    assert by["req-1"].arrived_at == by["req-0"].arrived_at + by["req-1"].think_time  # a placeholder
    fast = rescale(trace, 20.0, seed=3)
    assert [r.think_time for r in fast] == [r.think_time for r in trace]
    assert fast[2].arrived_at == pytest.approx(trace[2].arrived_at / 10)  # conversations come 10x as often
    for name in ("t.jsonl", "t.csv"):
        write_trace(str(tmp_path / name), trace)
        back = {r.request_id: r for r in read_trace(str(tmp_path / name))}
        assert all((back[r.request_id].after, back[r.request_id].conversation, back[r.request_id].think_time)
                   == (r.after, r.conversation, r.think_time) for r in trace), name


def test_simulated_turns_follow_their_predecessors_and_hit_the_cache():
    from aptray.config import EngineConfig
    from aptray.sim import configs_dir
    from aptray.sim.outcomes import SimRequest
    from aptray.sim.runner import simulate
    import os

    trace = make_trace(chat_samples(64), rate=1.0, think_time=0.3)
    reqs = [SimRequest(r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens, 1.0, 1.0,
                       r.conversation, r.shared_prefix, r.after, r.think_time or 0.0) for r in trace]
    model = os.path.join(configs_dir(), "opt-13b")
    for caching in (True, False):
        run = simulate(EngineConfig(model=model, scheduler="fcfs", enable_prefix_caching=caching), reqs)
        out = {o.request_id: o for o in run.outcomes}
        for r in trace:
            assert out[r.request_id].status == "finished"
            if r.after:
                assert out[r.request_id].arrival_time == pytest.approx(out[r.after].token_times[-1] + r.think_time)
        if caching:  # turn 2 finds turn 1's prompt and reply; c1 and c0 share the 64-token system prompt
            assert run.scheduler_stats["prefix_hit_tokens"] >= 64 + 80
        else:
            assert "prefix_hit_tokens" not in run.scheduler_stats


def test_simulated_follow_up_hits_the_blocks_of_the_reply_it_resends():
    """Turn 0: 32 prompt tokens and a 40-token reply; turn 1 resends both (71 computed: 4 full blocks
    of 16), where resending the stream alone would find only the prompt's 2."""
    from aptray.config import EngineConfig
    from aptray.sim import configs_dir
    from aptray.sim.outcomes import SimRequest
    from aptray.sim.runner import simulate
    import os

    reqs = [SimRequest("t0", 0.0, 32, 40, 1.0, 1.0, "c"), SimRequest("t1", 0.0, 80, 4, 1.0, 1.0, "c", after="t0")]
    config = EngineConfig(model=os.path.join(configs_dir(), "opt-13b"), scheduler="fcfs", block_size=16,
                          enable_prefix_caching=True)
    run = simulate(config, reqs)
    assert [o.status for o in run.outcomes] == ["finished", "finished"]
    assert run.scheduler_stats["prefix_hit_tokens"] == 64


def recording_engine(config, executor, **kw):
    """An Engine that keeps each request's prompt and, once it finishes, its reply."""
    from aptray.engine import Engine

    class RecordingEngine(Engine):
        def add_request(self, request_id, prompt, *a, **k):
            self.prompts[request_id] = list(prompt)
            return super().add_request(request_id, prompt, *a, **k)

        def step(self):
            outs = super().step()
            self.replies.update((o.request_id, list(o.outputs[0].token_ids)) for o in outs if o.finished)
            return outs
    engine = RecordingEngine(config, executor, **kw)
    engine.prompts, engine.replies = {}, {}
    return engine


def _check_resent(engine, trace):
    for r in trace:
        if r.after:  # the last turn's prompt, the reply the engine gave, then the next user message
            said = engine.prompts[r.after] + engine.replies[r.after]
            assert len(said) < r.num_prefill_tokens and engine.prompts[r.request_id][:len(said)] == said
            assert engine.prompts[r.request_id][len(said):] == conversation_ids(r)[len(said):]


@pytest.mark.parametrize("replay", ["in-process client", "CPU results"])
def test_engine_replays_resend_the_reply_the_engine_gave(replay, tmp_path):
    from aptray.config import EngineConfig
    from aptray.executor.local import LocalExecutor
    from aptray.model.factory import make_tiny_model
    from loadgen import results_cpu
    from loadgen.clients import InProcessEngineClient

    path = make_tiny_model(str(tmp_path / "opt"), arch="opt", hidden_size=32, num_layers=2, num_heads=2)
    config = EngineConfig(model=path, block_size=4)
    trace = make_trace(chat_samples(16), rate=50.0, think_time=0.05)
    if replay == "in-process client":
        engines = []
        InProcessEngineClient(lambda: engines.append(recording_engine(config, LocalExecutor(config))) or engines[0],
                              ttft_slo=5, tbt_slo=5).run(trace)
        engine = engines[0]
    else:
        engine = recording_engine(config, results_cpu.cpu_timed_executor(config), clock=results_cpu.CpuClock())
        records, _, stats = results_cpu.replay(engine, trace, 5.0, 5.0)
        assert all(r.status == "finished" for r in records)
        # turn 1 finds turn 0's 36 + 8 (43 computed: 40), turn 2 turn 1's 56 + 8 (63: 60); c1 the system prompt
        assert stats["prefix_hit_tokens"] >= 16 + 40 + 60
    _check_resent(engine, trace)


def test_in_process_client_runs_turns_as_a_closed_loop(tmp_path):
    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.model.factory import make_tiny_model
    from loadgen.clients import InProcessEngineClient

    path = make_tiny_model(str(tmp_path / "opt"), arch="opt", hidden_size=32, num_layers=2, num_heads=2)
    config = EngineConfig(model=path, block_size=4)
    trace = make_trace(chat_samples(16), rate=50.0, think_time=0.05)
    res = InProcessEngineClient(lambda: Engine(config, LocalExecutor(config)), ttft_slo=5, tbt_slo=5).run(trace)
    rec = {r.request_id: r for r in res.records}
    assert all(r.status == "finished" for r in res.records)
    for r in trace:
        if r.after:
            assert rec[r.request_id].arrived_at >= rec[r.after].finished_at
    s = summarize(res.records, res.duration, stats=res.info["scheduler_stats"])
    assert s["prefix_cache"]["hit_tokens"] >= 16 + 16 and 0 < s["prefix_cache"]["hit_rate_tokens"] < 1


def test_remote_replay_sends_a_turn_after_the_previous_ends():
    trace = make_trace(chat_samples(), rate=100.0, think_time=0.05)
    sent = {}

    async def send(r, t0):  # a server that answers after 0.1 s
        sent[r.request_id] = r.arrived_at
        await asyncio.sleep(0.1)
        now = time.perf_counter() - t0
        return RequestRecord.from_token_times(r.request_id, r.arrived_at, r.num_prefill_tokens, 1, 1.0, 1.0, [now])
    records, _ = asyncio.run(replay_at_arrivals(trace, send, 8, None))
    assert [r.request_id for r in records] == [r.request_id for r in trace]
    ends = {r.request_id: r.finished_at for r in records}
    for r in trace:
        if r.after:
            assert sent[r.request_id] >= ends[r.after] + r.think_time - 1e-3


def test_prefix_counters_read_from_metrics_text(tmp_path):
    import http.server
    import threading

    text = (b"# HELP aptray_prefix_cache_hit_tokens_total x\naptray_prefix_cache_hit_tokens_total 30.0\n"
            b"aptray_prefix_cache_queried_tokens_total 120.0\naptray_prefix_cache_hit_tokens_created 1.7e9\n")

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        got = read_prefix_counters(f"http://127.0.0.1:{srv.server_port}/metrics")
    finally:
        srv.shutdown()
    assert got == {"prefix_hit_tokens": 30.0, "prefix_queried_tokens": 120.0}
    assert read_prefix_counters("http://127.0.0.1:9/metrics") == {}


def test_a_paused_cpu_clock_counts_none_of_the_threads_work():
    from loadgen import results_cpu

    def burn(seconds):
        t = time.thread_time()
        while time.thread_time() - t < seconds:
            pass
    clock = results_cpu.CpuClock()
    clock.pause()
    paused_at = clock()
    burn(0.02)
    assert clock() == paused_at
    clock.resume()
    burn(0.02)
    assert clock() >= paused_at + 0.02
    clock.advance_to(clock() + 5.0)  # an idle gap skipped
    assert clock() >= paused_at + 5.02


def test_lockstep_replays_interleave_two_engines_each_on_its_own_clock(tmp_path):
    """Two engines (prefix caching off and on) replayed in lockstep on one thread: their steps
    interleave (the engine whose clock is behind goes next; a clock counting the other's steps would
    run one engine's replay to its end first), every turn of each finishes and resends the reply its
    own engine gave, and the two clocks together count no more CPU time than the thread spent."""

    from aptray.config import EngineConfig
    from aptray.model.factory import make_tiny_model
    from loadgen import results_chat, results_cpu

    path = make_tiny_model(str(tmp_path / "opt"), arch="opt", hidden_size=32, num_layers=2, num_heads=2)
    trace = make_trace(chat_samples(16), rate=50.0, think_time=0.05)
    engines, stepped = [], []
    for caching in (False, True):
        config = EngineConfig(model=path, block_size=4, enable_prefix_caching=caching)
        engine = recording_engine(config, results_cpu.cpu_timed_executor(config), clock=results_cpu.CpuClock())
        step = engine.step
        engine.step = lambda step=step, i=len(engines): (stepped.append(i), step())[1]
        engines.append(engine)
    t0 = time.thread_time()
    (off, off_duration, off_stats), (on, on_duration, on_stats) = results_cpu.replay_in_lockstep(engines, trace, 5.0, 5.0)
    spent = time.thread_time() - t0
    assert all(r.status == "finished" for r in off + on)
    assert off_stats.get("prefix_hit_tokens", 0) == 0 and on_stats["prefix_hit_tokens"] >= 16 + 40 + 60
    for engine in engines:
        _check_resent(engine, trace)
    # interleaved: each engine stepped before the other's last step
    assert stepped.index(0) < len(stepped) - 1 - stepped[::-1].index(1)
    assert stepped.index(1) < len(stepped) - 1 - stepped[::-1].index(0)
    skipped = sum(e.clock._skipped for e in engines)
    assert 0 < off_duration + on_duration - skipped <= spent
    # the chat part pairs each policy's two runs so; a label without its twin runs alone
    assert results_chat.off_beside_on(["apt-hybrid+prefix", "apt-hybrid", "apt-kv+prefix", "fcfs"]) == [
        ["apt-hybrid", "apt-hybrid+prefix"], ["apt-kv+prefix"], ["fcfs"]]
    assert results_chat.CPU_SETUP.lockstep is results_chat.off_beside_on
