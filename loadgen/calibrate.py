"""Validate the simulator on this machine: calibrate the cost model to the real CPU engine (small
random OPT), then replay one trace on both and compare TTFT/TBT percentiles.

Both sides run on the same kind of clock. The calibration fits whole engine steps in process CPU
seconds (aptray.sim.calibrate); the real replay runs the engine on a clock that advances by the
process's CPU seconds while it works and jumps to the next arrival while it is idle, which is
the wall clock of a machine of its own. The wall-clock replay (InProcessEngineClient, real sleeps)
is reported beside it: on a shared machine it is stretched by whatever else runs.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from loadgen.clients import InProcessEngineClient, SimClient, prompt_ids
from loadgen.samples import Sample
from loadgen.metrics import RequestRecord, summarize
from loadgen.traces import TraceRequest, make_trace


def small_opt(path: str) -> str:
    from aptray.model.factory import make_tiny_model
    if not os.path.isfile(os.path.join(path, "config.json")):
        make_tiny_model(path, "opt", hidden_size=256, num_layers=4, num_heads=8, max_positions=1024, vocab_size=512)
    return path


def validation_trace(n: int, rate: float, seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    samples = [Sample("", int(rng.integers(8, 300)), int(rng.integers(4, 64))) for _ in range(n)]
    return make_trace(samples, rate, 1.0, seed)


class CpuReplayClock:
    """Process CPU seconds while the engine works; skip_to() jumps over idle time to an arrival."""

    def __init__(self):
        from aptray.sim.calibrate import cpu_clock
        self._cpu = cpu_clock
        self._offset = -cpu_clock()

    def __call__(self) -> float:
        return self._cpu() + self._offset

    def skip_to(self, t: float) -> None:
        now = self()
        if t > now:
            self._offset += t - now


def replay_on_cpu_clock(engine_factory, trace: list[TraceRequest], ttft_slo: float, tbt_slo: float,
                        seed: int = 0) -> tuple[list[RequestRecord], float]:
    """The real engine on CpuReplayClock: the same loop as InProcessEngineClient (requests join between
    steps with their true arrival times), but idle gaps are skipped instead of slept."""
    from aptray.sim.calibrate import one_torch_thread

    clock = CpuReplayClock()
    engine = engine_factory(clock)
    rng = np.random.default_rng(seed)
    trace = sorted(trace, key=lambda r: r.arrived_at)
    prompts = [prompt_ids(r, None, engine.config.spec.vocab_size, rng) for r in trace]
    by_id = {r.request_id: r for r in trace}
    records: dict[str, RequestRecord] = {}
    start = clock()

    def record(r, status, times=(), preemptions=0):
        records[r.request_id] = RequestRecord.from_token_times(
            r.request_id, r.arrived_at, r.num_prefill_tokens, r.num_decode_tokens, ttft_slo, tbt_slo,
            [t - start for t in times], status, preemptions)

    with one_torch_thread():
        _replay_loop(engine, clock, start, trace, prompts, by_id, record, ttft_slo, tbt_slo)
    engine.executor.shutdown()
    return [records[r.request_id] for r in trace], clock() - start


def _replay_loop(engine, clock, start, trace, prompts, by_id, record, ttft_slo, tbt_slo) -> None:
    from aptray.sampling_params import SamplingParams

    i = 0
    while i < len(trace) or engine.has_unfinished():
        now = clock() - start
        while i < len(trace) and trace[i].arrived_at <= now:
            r = trace[i]
            sp = SamplingParams(temperature=0.0, max_tokens=r.num_decode_tokens, ignore_eos=True,
                                ttft_slo=ttft_slo, tbt_slo=tbt_slo)
            try:
                engine.add_request(r.request_id, prompts[i], sp, arrival_time=start + r.arrived_at)
            except ValueError:
                record(r, "rejected")
            i += 1
        if not engine.has_unfinished():
            if i < len(trace):
                clock.skip_to(start + trace[i].arrived_at)
            continue
        for out in engine.step():
            if out.finished:
                record(by_id[out.request_id], "finished", out.metrics.token_times, out.metrics.num_preemptions)


def _ratios(real: dict, sim: dict) -> dict:
    return {f"{k}_{p}": sim[k][p] / real[k][p] for k in ("ttft_s", "tbt_s") for p in ("p50", "p90", "p99")}


def calibrate_and_validate(out_dir: str, num_requests: int = 200, rate: float = 4.0, seed: int = 0,
                           ttft_slo: float = 0.5, tbt_slo: float = 0.1, threads: int = 1,
                           wall_clock: bool = True, rounds: int = 3) -> dict:
    """rounds x (calibration waves, then a CPU-clock replay of the trace): interleaved so that both see
    the same mix of machine states; the cost model is fitted to the median time of each step shape,
    its scatter (replicate_scatter) becomes the simulator's step jitter, and the real side's percentiles
    pool every round's records."""
    import torch

    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.sim.calibrate import collect_steps, fit_cpu, median_per_shape, replicate_scatter

    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    model = small_opt(os.path.join(out_dir, "opt-small"))
    config = lambda: EngineConfig(model=model, num_cache_blocks=512, block_size=16)  # noqa: E731
    trace = validation_trace(num_requests, rate, seed)

    def engine(clock=None):
        c = config()
        return Engine(c, LocalExecutor(c), clock=clock) if clock is not None else Engine(c, LocalExecutor(c))

    samples, real_recs, real_dur = [], [], 0.0
    for k in range(rounds):
        samples += collect_steps(config(), seed=k, repeats=1)
        recs, dur = replay_on_cpu_clock(engine, trace, ttft_slo, tbt_slo, seed)
        real_recs += recs
        real_dur += dur
    plain = fit_cpu(median_per_shape(samples), config())
    scatter = replicate_scatter(samples)
    cal = plain.with_jitter(scatter)
    paths = {"cpu_calibration.json": cal, "cpu_calibration_no_jitter.json": plain}
    for name, c in paths.items():
        c.save(os.path.join(out_dir, name))

    def sim_of(name):
        res = SimClient(config, ttft_slo=ttft_slo, tbt_slo=tbt_slo, calibration=os.path.join(out_dir, name),
                        stop_when_decided=False).run(trace)
        return summarize(res.records, res.duration)

    out = {"calibration": os.path.join(out_dir, "cpu_calibration.json"), "fit_error": vars(cal.error),
           "step_samples": len(samples), "step_shapes": cal.error.n, "rounds": rounds,
           "step_overhead_s": cal.step_overhead, "seq_overhead_s": cal.seq_overhead,
           "scatter": {"n": int(scatter.size), **{f"p{p}": float(np.exp(np.percentile(scatter, p)))
                                                 for p in (10, 50, 90, 99)}},
           "trace": {"num_requests": num_requests, "rate": rate, "seed": seed, "ttft_slo": ttft_slo,
                     "tbt_slo": tbt_slo},
           "real": summarize(real_recs, real_dur), "sim": sim_of("cpu_calibration.json"),
           "sim_no_jitter": sim_of("cpu_calibration_no_jitter.json")}
    out["sim_over_real"] = _ratios(out["real"], out["sim"])
    out["sim_no_jitter_over_real"] = _ratios(out["real"], out["sim_no_jitter"])
    if wall_clock:
        wall = InProcessEngineClient(engine, ttft_slo=ttft_slo, tbt_slo=tbt_slo, seed=seed).run(trace)
        out["real_wall_clock"] = summarize(wall.records, wall.duration)
        out["sim_over_real_wall_clock"] = _ratios(out["real_wall_clock"], out["sim"])
    with open(os.path.join(out_dir, "validation.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(args) -> None:
    out = calibrate_and_validate(args.out_dir or tempfile.mkdtemp(prefix="aptray-cal-"), args.num_requests,
                                 args.rate, args.seed, args.ttft_slo, args.tbt_slo, args.threads,
                                 not args.no_wall_clock, args.rounds)
    sc = out["scatter"]
    print(f"fit: mean |err| {out['fit_error']['mean']:.1%}, median {out['fit_error']['median']:.1%} over "
          f"{out['step_shapes']} step shapes ({out['step_samples']} steps, {out['rounds']} rounds); host overhead "
          f"{out['step_overhead_s'] * 1e6:.0f} us/step + {out['seq_overhead_s'] * 1e6:.1f} us/sequence; "
          f"same-shape scatter p10 {sc['p10']:.2f}x p90 {sc['p90']:.2f}x p99 {sc['p99']:.2f}x")
    sources = [("real", "real (CPU clock)"), ("sim", "simulator"), ("sim_no_jitter", "sim, no jitter")]
    if "real_wall_clock" in out:
        sources.append(("real_wall_clock", "real (wall clock)"))
    for key in ("ttft_s", "tbt_s"):
        for src, name in sources:
            p = out[src][key]
            print(f"{key:6s} {name:18s} p50 {p['p50'] * 1e3:8.2f} ms  p90 {p['p90'] * 1e3:8.2f} ms  "
                  f"p99 {p['p99'] * 1e3:8.2f} ms")
    for key, name in (("sim_over_real", "sim / real"), ("sim_no_jitter_over_real", "sim no jitter / real")):
        print(f"{name:22s}" + "  ".join(f"{k} {v:.2f}" for k, v in out[key].items()))
    print(f"attainment real {out['real']['attainment']:.3f} sim {out['sim']['attainment']:.3f}")
