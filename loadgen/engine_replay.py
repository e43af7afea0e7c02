"""Replays a trace on an aptray Engine in this process, on the engine's clock.

Requests are added at their arrival times; a conversation's follow-up arrives a think time after
the turn it follows ends and resends that turn's prompt and reply (aptray.sim.arrivals,
aptray.sim.prompt_ids.follow_up_ids). Used by loadgen's InProcessEngineClient (wall clock) and the
CPU results (the serving thread's CPU time, idle gaps skipped).
"""
from __future__ import annotations

from dataclasses import replace
from operator import attrgetter

from aptray.sampling_params import SamplingParams
from aptray.sim.arrivals import Arrivals
from aptray.sim.prompt_ids import follow_up_ids
from loadgen.metrics import RequestRecord


def replay_on_engine(engine, trace, prompts: dict, slos, idle, timeout: float | None = None,
                     progress=None) -> tuple[list[RequestRecord], float]:
    """Every request of trace (sorted by arrival) greedy with ignore_eos; returns one record per
    request in trace order and the run's duration on engine.clock.
    prompts: request id -> token ids (a follow-up's: its own stream, extended here by what was said
    before it). slos(r) -> (TTFT, TBT) SLOs. idle(t): wait for the engine clock's time t (nothing to
    run until then). timeout: abort what is left this many seconds after the last arrival."""
    steps = replay_steps(engine, trace, prompts, slos, idle, timeout, progress)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def replay_steps(engine, trace, prompts: dict, slos, idle, timeout: float | None = None, progress=None):
    """replay_on_engine one engine step (or idle wait) at a time: a generator that yields after each
    and returns (records, duration), so that a driver can interleave several engines' replays on one
    thread (results_cpu.replay_in_lockstep)."""
    clock = engine.clock
    prompts = dict(prompts)
    sent = {}  # request id -> the request as sent: a follow-up's arrived_at is when it came
    records: dict[str, RequestRecord] = {}
    arrivals = Arrivals(trace, at=attrgetter("arrived_at"))
    start, last_arrival = clock(), 0.0

    def record(r, status, times=(), preemptions=0, error="", reply=None):
        ttft, tbt = slos(r)
        records[r.request_id] = RequestRecord.from_token_times(
            r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens, ttft, tbt,
            [t - start for t in times], status, preemptions, error)
        followed = reply is not None and arrivals.is_followed(r.request_id)
        arrivals.ended(r.request_id, clock() - start, prompts[r.request_id] + reply if followed else None)
        if progress is not None:
            progress(1)

    while arrivals or engine.has_unfinished():
        now = clock() - start
        for at, r in arrivals.pop_due(now):
            r = sent[r.request_id] = replace(r, arrived_at=at)
            prompts[r.request_id] = follow_up_ids(prompts[r.request_id], arrivals.said_before(r.request_id))
            last_arrival = at
            ttft, tbt = slos(r)
            sp = SamplingParams(temperature=0.0, max_tokens=r.num_decode_tokens, ignore_eos=True,
                                ttft_slo=ttft, tbt_slo=tbt)
            try:
                engine.add_request(r.request_id, prompts[r.request_id], sp, arrival_time=start + at)
            except ValueError as e:
                record(r, "rejected", error=str(e))
        if timeout is not None and not arrivals and not arrivals.waiting_on_others and now > last_arrival + timeout:
            for rid in list(engine.scheduler.requests):
                req = engine.scheduler.requests[rid]
                engine.abort(rid)
                record(sent[rid], "aborted", req.token_times, req.num_preemptions)
            break
        if not engine.has_unfinished():
            if arrivals:
                idle(start + arrivals.next_time)
            yield
            continue
        for out in engine.step():
            if out.finished:
                status = "aborted" if out.outputs[0].finish_reason == "abort" else "finished"
                record(sent[out.request_id], status, out.metrics.token_times, out.metrics.num_preemptions,
                       reply=out.outputs[0].token_ids)
        yield
    duration = clock() - start
    return [records.get(r.request_id) or RequestRecord(r.request_id, sent.get(r.request_id, r).arrived_at,
                                                       r.num_prefill_tokens, r.num_decode_tokens, *slos(r),
                                                       status="unfinished")
            for r in trace], duration
