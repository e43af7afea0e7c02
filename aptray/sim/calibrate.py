"""Calibration: fit the cost model's coefficients to step times measured on the real engine.

Without one, GPU coefficients come from the vidur profiles. On this machine the same cost model is
fitted to the real engine's own step times (a small random-weight model), so the simulator can be
checked against the real engine on one trace (loadgen calibrate does that comparison); on a GPU,
loadgen.gpu_check fits it to the engine's steps there (fit_steps with GPU_X0, aptray.sim.measured).

What is fitted is the time of a whole engine step as a client sees it: the scheduler, the model
runner and the engine's post-processing, not only the executor's kernels (the executor's own
step_time leaves out ~60-120 us of Python per step, 5-10% of a decode step here). It is measured in
process CPU seconds: the engine runs on one thread (one torch thread), so on a machine of its own
that is its wall time, and other people's processes on a shared machine do not stretch it.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy.optimize import least_squares

from aptray.config import EngineConfig
from aptray.executor.base import Executor
from aptray.plan import BatchPlan, StepResult
from aptray.sim.cost_model import CostModel
from aptray.sim.fit import FitError, HardwareFit, LinearRoofline


def cpu_clock() -> float:
    """Seconds of CPU this process has used: the clock of calibration and of the validation replay
    (equal to the engine's wall time only with one torch thread: see one_torch_thread)."""
    return time.process_time()


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread meanwhile: with more, idle OpenMP workers spin and bill CPU time."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class StepSample:
    seqs: list[tuple[str, int, int, bool]]  # (cache_kind, num_tokens, context_len, sample)
    conversions: list[tuple[str, int]]
    seconds: float  # the whole engine step (scheduler + executor + post-processing), CPU seconds
    executor_seconds: float = 0.0  # the executor's own step_time (wall), for reference


class RecordingExecutor(Executor):
    """Runs plans on an inner executor and keeps each plan's shape with its measured step time."""

    def __init__(self, inner: Executor):
        self.inner = inner
        self.num_blocks = inner.num_blocks
        self.samples: list[StepSample] = []

    def execute(self, plan: BatchPlan) -> StepResult:
        result = self.inner.execute(plan)
        self.samples.append(StepSample(
            [(s.cache_kind, len(s.token_ids), s.context_len, s.sample) for s in plan.seqs],
            [(c.to_kind, c.num_tokens) for c in plan.conversions], result.step_time, result.step_time))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()


def timed_step(engine, rec: RecordingExecutor, clock=cpu_clock):
    """engine.step(), stamping the sample it produced (if any) with the step's time on clock."""
    n = len(rec.samples)
    t0 = clock()
    out = engine.step()
    if len(rec.samples) > n:
        rec.samples[-1].seconds = clock() - t0
    return out


RAGGED_LENGTHS_SEED = 1234


def collect_steps(config: EngineConfig, batch_sizes=(1, 2, 4, 8, 16), prompt_lens=(8, 32, 128, 384),
                  output_len: int = 24, seed: int = 0, repeats: int = 2, executor: Executor | None = None,
                  clock=cpu_clock) -> list[StepSample]:
    """Run waves of requests through the real engine; every step becomes a sample. A wave's prompts
    scatter around its length (0.5-1.5x), as real batches are ragged: a batch of equal contexts runs
    its decode attention without a mask, and a fit to those alone priced the replay's ragged decode
    steps 13-28% low. The lengths come from a fixed generator, so every round repeats the same step
    shapes (their spread is the machine's scatter); seed draws the token ids. executor: the one to
    drive (default: a LocalExecutor of config); clock: what a step's time is read on."""
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    from aptray.sampling_params import SamplingParams

    rec = RecordingExecutor(executor or LocalExecutor(config))
    engine = Engine(config, rec)
    rng = np.random.default_rng(seed)
    lengths = np.random.default_rng(RAGGED_LENGTHS_SEED)
    vocab, limit = config.spec.vocab_size, config.spec.max_model_len
    n = 0
    with one_torch_thread():
        for batch in [b for _ in range(repeats) for b in batch_sizes]:
            for plen in prompt_lens:
                for _ in range(batch):
                    size = min(max(1, int(plen * lengths.uniform(0.5, 1.5))), limit - output_len - 1)
                    ids = rng.integers(4, vocab, size=size).tolist()
                    engine.add_request(f"cal-{n}", ids, SamplingParams(temperature=0.0, max_tokens=output_len,
                                                                       ignore_eos=True))
                    n += 1
                while engine.has_unfinished():
                    timed_step(engine, rec, clock)
    rec.shutdown()
    return rec.samples[1:]  # the first step pays one-off warm-up


# parameters, all in log space: step overhead, per-sequence overhead, ragged-decode overhead,
# GEMM (c0, FLOP/s, B/s), elementwise (c0, B/s), attention (c0, FLOP/s, B/s), hidden-decode layer overhead
_NAMES = ("step_overhead", "seq_overhead", "ragged_overhead", "gemm_c0", "gemm_flops", "gemm_bytes", "elem_c0", "elem_bytes",
          "attn_c0", "attn_flops", "attn_bytes", "hidden_layer_overhead")
_X0 = (1e-4, 1e-5, 1e-5, 2e-5, 5e10, 5e9, 5e-6, 5e9, 2e-5, 2e10, 5e9, 1e-6)
# the same starting point for a GPU (H100/H200 class): each coefficient may move e^9 either way from it
GPU_X0 = (1e-3, 2e-5, 1e-6, 5e-6, 5e14, 3e12, 5e-6, 2e12, 1e-5, 3e14, 2e12, 1e-5)


def _unpack(p, profile: str = "cpu") -> tuple[HardwareFit, float]:
    e = [math.exp(x) for x in p]
    gemm = LinearRoofline(e[3], e[4], e[5])
    elem = LinearRoofline(e[6], math.inf, e[7])
    attn = LinearRoofline(e[8], e[9], e[10])
    return HardwareFit(profile, gemm, elem, elem, elem, attn, {}, seq_overhead=e[1], ragged_overhead=e[2],
                       hidden_layer_overhead=e[11]), e[0]


def predict(samples: list[StepSample], config: EngineConfig, hw: HardwareFit, overhead: float) -> np.ndarray:
    cost = CostModel(config.spec, hw, config.tensor_parallel_size, config.hidden_attention, overhead,
                     hw.seq_overhead, ragged_overhead=hw.ragged_overhead)
    return np.array([cost.step_time(s.seqs, s.conversions) for s in samples])


@dataclass
class Calibration:
    hardware: HardwareFit
    step_overhead: float
    error: FitError
    meta: dict = field(default_factory=dict)  # where it was measured: device, model, dtype, date, samples

    @property
    def seq_overhead(self) -> float:
        return self.hardware.seq_overhead

    def with_jitter(self, jitter) -> "Calibration":
        return Calibration(replace(self.hardware, step_jitter=tuple(float(x) for x in jitter)), self.step_overhead,
                           self.error, self.meta)

    def save(self, path: str) -> None:
        hw = self.hardware
        laws = {k: asdict(getattr(hw, k)) for k in ("gemm", "layernorm", "activation", "residual_add", "attention")}
        with open(path, "w") as f:
            json.dump({"profile": hw.profile, "laws": laws, "step_overhead": self.step_overhead,
                       "seq_overhead": hw.seq_overhead, "ragged_overhead": hw.ragged_overhead,
                       "hidden_layer_overhead": hw.hidden_layer_overhead, "step_jitter": list(hw.step_jitter),
                       "error": asdict(self.error), "meta": self.meta},
                      f, indent=1, default=str)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        with open(path) as f:
            d = json.load(f)
        laws = {k: LinearRoofline(float(v["c0"]), float(v["flop_rate"]), float(v["byte_rate"]))
                for k, v in d["laws"].items()}
        hw = HardwareFit(d.get("profile", "cpu"), all_reduce={}, seq_overhead=float(d.get("seq_overhead", 0.0)),
                         ragged_overhead=float(d.get("ragged_overhead", 0.0)),
                         hidden_layer_overhead=float(d.get("hidden_layer_overhead", 0.0)),
                         step_jitter=tuple(d.get("step_jitter", ())), **laws)
        return cls(hw, d["step_overhead"], FitError(**d["error"]), d.get("meta", {}))


def fastest_per_shape(samples: list[StepSample]) -> list[StepSample]:
    """One sample per distinct plan shape, its fastest time (the machine's best case)."""
    best: dict = {}
    for smp in samples:
        key = (tuple(smp.seqs), tuple(smp.conversions))
        if key not in best or smp.seconds < best[key].seconds:
            best[key] = smp
    return list(best.values())


def _by_shape(samples: list[StepSample]) -> dict:
    groups: dict = {}
    for smp in samples:
        groups.setdefault((tuple(smp.seqs), tuple(smp.conversions)), []).append(smp)
    return groups


def median_per_shape(samples: list[StepSample]) -> list[StepSample]:
    """One sample per distinct plan shape, with the median time of its repeats: the typical step."""
    out = []
    for group in _by_shape(samples).values():
        out.append(StepSample(group[0].seqs, group[0].conversions, float(np.median([s.seconds for s in group])),
                              float(np.median([s.executor_seconds for s in group]))))
    return out


def replicate_scatter(samples: list[StepSample], min_repeats: int = 3) -> np.ndarray:
    """log(time / median time of the same shape) over shapes measured at least min_repeats times: how
    much the same work's time scatters on this machine, free of any cost-model error."""
    out = []
    for group in _by_shape(samples).values():
        if len(group) >= min_repeats:
            t = np.array([s.seconds for s in group])
            out.extend(np.log(t / np.median(t)))
    return np.array(out)


def fit_cpu(samples: list[StepSample], config: EngineConfig) -> Calibration:
    return fit_steps(samples, config)


def fit_steps(samples: list[StepSample], config: EngineConfig, x0=_X0, profile: str = "cpu") -> Calibration:
    """Least squares on log(pred/measured): a plain fit, then a soft-L1 refit from it so that a few
    disturbed steps weigh little; whichever has the lower median error wins. Given every sample
    (not only the fastest per shape), this fits the typical step, which is what a replay sees.
    x0: the starting coefficients (_X0 for this CPU, GPU_X0 for a GPU); profile names the fit."""
    measured = np.array([s.seconds for s in samples])

    def residual(p):
        hw, overhead = _unpack(p, profile)
        return np.log(predict(samples, config, hw, overhead) / measured)

    x0 = np.array([math.log(v) for v in x0])
    bounds = (x0 - 9, x0 + 9)
    plain = least_squares(residual, x0, bounds=bounds, diff_step=1e-3)
    robust = least_squares(residual, plain.x, bounds=bounds, diff_step=1e-3, loss="soft_l1", f_scale=0.1)
    fits = []
    for x in (plain.x, robust.x):
        hw, overhead = _unpack(x, profile)
        fits.append(Calibration(hw, overhead, FitError.of(predict(samples, config, hw, overhead), measured)))
    return min(fits, key=lambda c: c.error.median)
