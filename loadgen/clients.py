"""Clients replay a trace against a server and return one RequestRecord per request.

Client is the pluggable interface (HTTP and gRPC clients subclass it later). Here:
InProcessEngineClient drives an Engine in this process on real time; SimClient drives the same
Engine on virtual time through aptray.sim.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from loadgen.metrics import RequestRecord
from loadgen.traces import TraceRequest


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration: float  # seconds on the run's clock, first arrival to the end
    info: dict = field(default_factory=dict)  # scheduler counters, steps, ...


class Client(ABC):
    """Replays trace (arrival times relative to the start) with SLO defaults for requests that set none."""

    def __init__(self, ttft_slo: float = 1.0, tbt_slo: float = 1.0):
        self.ttft_slo = ttft_slo
        self.tbt_slo = tbt_slo

    def slos(self, r: TraceRequest) -> tuple[float, float]:
        return r.ttft_slo or self.ttft_slo, r.tbt_slo or self.tbt_slo

    @abstractmethod
    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        """progress: optional callable(n) called as requests end (a tqdm's update)."""


def prompt_ids(r: TraceRequest, tokenizer, vocab_size: int, rng: np.random.Generator) -> list[int]:
    """The trace's prompt text when it has one and a tokenizer is given (cut to its length), else random ids."""
    if r.prompt is not None and tokenizer is not None:
        ids = tokenizer(r.prompt, add_special_tokens=False)["input_ids"][:r.num_prefill_tokens]
        if ids:
            return ids
    return rng.integers(4, vocab_size, size=r.num_prefill_tokens).tolist()


class InProcessEngineClient(Client):
    """Drives an aptray Engine built by engine_factory() on real time, replaying arrival times."""

    def __init__(self, engine_factory, tokenizer=None, ttft_slo: float = 1.0, tbt_slo: float = 1.0, seed: int = 0,
                 timeout: float | None = None):
        super().__init__(ttft_slo, tbt_slo)
        self.engine_factory = engine_factory
        self.tokenizer = tokenizer
        self.seed = seed
        self.timeout = timeout  # abort whatever is left this many seconds after the last arrival

    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        from aptray.sampling_params import SamplingParams

        engine = self.engine_factory()
        clock = engine.clock
        vocab = engine.config.spec.vocab_size
        rng = np.random.default_rng(self.seed)
        trace = sorted(trace, key=lambda r: r.arrived_at)
        prompts = [prompt_ids(r, self.tokenizer, vocab, rng) for r in trace]  # before the clock starts
        by_id = {r.request_id: r for r in trace}
        records: dict[str, RequestRecord] = {}
        start = clock()
        i = 0

        def record(r, status, times=(), preemptions=0):
            ttft, tbt = self.slos(r)
            records[r.request_id] = RequestRecord.from_token_times(
                r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens, ttft, tbt,
                [t - start for t in times], status, preemptions)
            if progress is not None:
                progress(1)

        while i < len(trace) or engine.has_unfinished():
            now = clock() - start
            while i < len(trace) and trace[i].arrived_at <= now:
                r = trace[i]
                i += 1
                ttft, tbt = self.slos(r)
                sp = SamplingParams(temperature=0.0, max_tokens=r.num_decode_tokens, ignore_eos=True,
                                    ttft_slo=ttft, tbt_slo=tbt)
                try:
                    engine.add_request(r.request_id, prompts[i - 1], sp, arrival_time=start + r.arrived_at)
                except ValueError:
                    record(r, "rejected")
            if self.timeout is not None and i == len(trace) and now > trace[-1].arrived_at + self.timeout:
                for rid in list(engine.scheduler.requests):
                    req = engine.scheduler.requests[rid]
                    engine.abort(rid)
                    record(by_id[rid], "aborted", req.token_times, req.num_preemptions)
                break
            if not engine.has_unfinished():
                if i < len(trace):
                    time.sleep(max(0.0, trace[i].arrived_at - (clock() - start)))
                continue
            for out in engine.step():
                if out.finished:
                    status = "aborted" if out.outputs[0].finish_reason == "abort" else "finished"
                    record(by_id[out.request_id], status, out.metrics.token_times, out.metrics.num_preemptions)
        engine.executor.shutdown()
        recs = [records.get(r.request_id) or RequestRecord(r.request_id, r.arrived_at, r.num_prefill_tokens,
                                                           r.num_decode_tokens, *self.slos(r), status="unfinished")
                for r in trace]
        return RunResult(recs, clock() - start, {"scheduler_stats": dict(engine.scheduler.stats)})


class SimClient(Client):
    """Replays a trace through aptray.sim: the real Engine and scheduler, a cost-model executor, virtual time."""

    def __init__(self, config_factory, gpu: str = "a100-40gb", step_overhead: float = 1e-3,
                 ttft_slo: float = 1.0, tbt_slo: float = 1.0, max_sim_time: float | None = None,
                 stop_when_decided: bool = True, calibration: str | None = None):
        super().__init__(ttft_slo, tbt_slo)
        self.calibration = calibration  # a CPU calibration JSON (aptray.sim.calibrate) replacing gpu's costs
        self.stop_when_decided = stop_when_decided  # exact attainment, less simulated drain
        self.config_factory = config_factory  # () -> EngineConfig, fresh per run
        self.gpu = gpu
        self.step_overhead = step_overhead
        self.max_sim_time = max_sim_time

    def run(self, trace: list[TraceRequest], progress=None) -> RunResult:
        from aptray.sim.runner import SimRequest, simulate

        hardware, overhead = None, self.step_overhead
        if self.calibration:
            from aptray.sim.calibrate import Calibration
            cal = Calibration.load(self.calibration)
            hardware, overhead = cal.hardware, cal.step_overhead

        reqs = [SimRequest(r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens, *self.slos(r))
                for r in trace]
        run = simulate(self.config_factory(), reqs, self.gpu, overhead, self.max_sim_time,
                       on_finish=(lambda _: progress(1)) if progress is not None else None,
                       stop_when_decided=self.stop_when_decided, hardware=hardware)
        by_id = {r.request_id: r for r in trace}
        records = []
        for o in run.outcomes:
            r = by_id[o.request_id]
            records.append(RequestRecord.from_token_times(r.request_id, r.arrived_at, r.num_prefill_tokens,
                                                          r.num_decode_tokens, *self.slos(r), o.token_times,
                                                          o.status, o.num_preemptions))
        info = {"steps": run.steps, "stopped_early": run.stopped_early, "busy_time_s": run.busy_time, "num_blocks": run.num_blocks,
                "scheduler_stats": run.scheduler_stats}
        return RunResult(records, run.sim_time, info)
