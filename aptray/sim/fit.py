"""Fit hardware coefficients to the vidur profiles: GEMM, elementwise and all-reduce time laws.

Each law is time = c0 + flops/flop_rate + bytes/byte_rate (a linear roofline), fitted by least
squares on log(predicted/measured), so every row counts by its relative error. The profiles
cover Llama/Qwen/InternLM/phi shapes; fitting on FLOPs and bytes rather than on shapes is what
lets the laws price OPT's GEMMs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from aptray.sim.gpus import PROFILED_GPU, GpuSpec
from aptray.sim.profiles import (DEFAULT_PROFILE_DIR, ELEMENTWISE_OPS, GEMM_OPS, AllReduceSample, OpSample,
                                 SendRecvSample, load_all_reduce, load_op_samples, load_send_recv)


@dataclass(frozen=True)
class LinearRoofline:
    c0: float  # seconds: launch and tail
    flop_rate: float  # FLOP/s (math.inf: the law ignores FLOPs)
    byte_rate: float  # bytes/s

    def time(self, flops: float, nbytes: float) -> float:
        return self.c0 + flops / self.flop_rate + nbytes / self.byte_rate

    def scaled(self, flop_scale: float, byte_scale: float) -> "LinearRoofline":
        return LinearRoofline(self.c0, self.flop_rate * flop_scale, self.byte_rate * byte_scale)


@dataclass(frozen=True)
class FitError:
    mean: float  # mean |pred/measured - 1|
    median: float
    p90: float
    n: int

    @classmethod
    def of(cls, pred: np.ndarray, measured: np.ndarray) -> "FitError":
        e = np.abs(pred / measured - 1.0)
        return cls(float(e.mean()), float(np.median(e)), float(np.percentile(e, 90)), int(e.size))


# FlashAttention-2 runs at roughly 70% of a plain GEMM's throughput on A100/H100; there are no
# attention profiles to fit, so prefill attention's FLOP rate is the fitted GEMM rate times this.
ATTENTION_FLOP_SHARE = 0.7


@dataclass(frozen=True)
class HardwareFit:
    """Coefficients for one profiled GPU type, and how well they reproduce the profile rows."""
    profile: str
    gemm: LinearRoofline
    layernorm: LinearRoofline
    activation: LinearRoofline
    residual_add: LinearRoofline
    attention: LinearRoofline  # roofline: fitted streaming bandwidth, GEMM rate x ATTENTION_FLOP_SHARE
    all_reduce: dict[int, LinearRoofline]  # by number of workers; bytes = 2 * elements
    errors: dict[str, FitError] = field(default_factory=dict)
    seq_overhead: float = 0.0  # host seconds per sequence in a step (0 for the GPU fits; the CPU calibration fits it)
    # seconds per step whose decode rows have unequal contexts (the CPU engine then builds a mask and
    # runs masked attention); 0 for the GPU fits, fitted by the CPU calibration
    ragged_overhead: float = 0.0
    # seconds per layer of a step with absorbed hidden decodes, beyond what its two GEMMs' c0 carry: the
    # path's other launches (casts, softmax, the split reduction). 0 for the vidur fits; a measured
    # profile fits it (an H100 ran hidden-row decode steps 16-21 ms slower than KV ones)
    hidden_layer_overhead: float = 0.0
    # measured scatter of a step's time about its typical value, as log ratios: the simulator multiplies
    # each step by exp(one of them), drawn by a seeded generator. Empty (no scatter) for the GPU fits.
    step_jitter: tuple[float, ...] = ()
    # one GPU to the next (pipeline stage boundaries); bytes = 2 * elements. None: no profile (the CPU fit)
    send_recv: LinearRoofline | None = None

    def send_recv_time(self, elements: float) -> float:
        if elements <= 0:
            return 0.0
        if self.send_recv is None:
            raise ValueError(f"the {self.profile!r} fit has no send/recv law: pipeline stages cannot be priced")
        return self.send_recv.time(0.0, 2.0 * elements)

    def all_reduce_time(self, elements: float, workers: int) -> float:
        if workers <= 1:
            return 0.0
        law = self.all_reduce.get(workers) or self.all_reduce[max(self.all_reduce)]
        return law.time(0.0, 2.0 * elements)

    def scaled(self, flop_scale: float, byte_scale: float) -> "HardwareFit":
        laws = {name: getattr(self, name).scaled(flop_scale, byte_scale)
                for name in ("gemm", "layernorm", "activation", "residual_add", "attention")}
        return HardwareFit(self.profile, all_reduce=self.all_reduce, errors=self.errors,
                           seq_overhead=self.seq_overhead, ragged_overhead=self.ragged_overhead,
                           hidden_layer_overhead=self.hidden_layer_overhead, step_jitter=self.step_jitter,
                           send_recv=self.send_recv, **laws)


def _fit(flops: np.ndarray, nbytes: np.ndarray, seconds: np.ndarray, use_flops: bool) -> LinearRoofline:
    def unpack(p):
        return LinearRoofline(float(p[0]) * 1e-6, math.exp(p[1]) if use_flops else math.inf, math.exp(p[2]))

    def residual(p):
        law = unpack(p)
        return np.log((law.c0 + flops / law.flop_rate + nbytes / law.byte_rate) / seconds)

    result = least_squares(residual, x0=[5.0, math.log(1e14), math.log(1e12)],
                           bounds=([0.0, 20.0, 20.0], [1e4, 40.0, 35.0]))
    return unpack(result.x)


def _predict(law: LinearRoofline, flops, nbytes):
    return law.c0 + flops / law.flop_rate + nbytes / law.byte_rate


def fit_ops(samples: list[OpSample], use_flops: bool) -> tuple[LinearRoofline, FitError]:
    flops = np.array([s.flops for s in samples]) if use_flops else np.zeros(len(samples))
    nbytes = np.array([s.bytes for s in samples])
    seconds = np.array([s.seconds for s in samples])
    law = _fit(flops, nbytes, seconds, use_flops)
    return law, FitError.of(_predict(law, flops, nbytes), seconds)


def fit_all_reduce(samples: list[AllReduceSample]) -> tuple[dict[int, LinearRoofline], dict[str, FitError]]:
    laws, errors = {}, {}
    for workers in sorted({s.num_workers for s in samples}):
        rows = [s for s in samples if s.num_workers == workers]
        nbytes = np.array([2.0 * s.size for s in rows])
        seconds = np.array([s.seconds for s in rows])
        law = _fit(np.zeros(len(rows)), nbytes, seconds, use_flops=False)
        laws[workers] = law
        errors[f"all_reduce_tp{workers}"] = FitError.of(_predict(law, 0.0, nbytes), seconds)
    return laws, errors


def fit_send_recv(samples: list[SendRecvSample]) -> tuple[LinearRoofline, FitError]:
    nbytes = np.array([2.0 * s.size for s in samples])
    seconds = np.array([s.seconds for s in samples])
    law = _fit(np.zeros(len(samples)), nbytes, seconds, use_flops=False)
    return law, FitError.of(_predict(law, 0.0, nbytes), seconds)


@functools.lru_cache(maxsize=None)
def fit_profile(profile: str, network: str, root: str = DEFAULT_PROFILE_DIR) -> HardwareFit:
    ops = load_op_samples(profile, root)
    errors = {}

    def law(name, rows, use_flops):
        fitted, errors[name] = fit_ops(rows, use_flops)
        return fitted

    gemm = law("gemm", [s for s in ops if s.op in GEMM_OPS], True)
    for op in GEMM_OPS:  # per-op view of the one GEMM law
        rows = [s for s in ops if s.op == op]
        errors[op] = FitError.of(np.array([gemm.time(s.flops, s.bytes) for s in rows]),
                                 np.array([s.seconds for s in rows]))
    layernorm = law("layernorm", [s for s in ops if s.op.endswith("layernorm")], False)
    activation = law("activation", [s for s in ops if s.op == "mlp_act"], False)
    residual_add = law("residual_add", [s for s in ops if s.op == "add"], False)
    # streaming bandwidth of the large memory-bound ops: what attention's HBM traffic is priced at
    stream = law("streaming", [s for s in ops if s.op in ELEMENTWISE_OPS and s.m >= 256], False)
    attention = LinearRoofline(stream.c0, gemm.flop_rate * ATTENTION_FLOP_SHARE, stream.byte_rate)
    ar_laws, ar_err = fit_all_reduce(load_all_reduce(network, root))
    errors.update(ar_err)
    send_recv, errors["send_recv"] = fit_send_recv(load_send_recv(network, root))
    return HardwareFit(profile, gemm, layernorm, activation, residual_add, attention, ar_laws, errors,
                       send_recv=send_recv)


def hardware_for(gpu: GpuSpec, root: str = DEFAULT_PROFILE_DIR) -> HardwareFit:
    """The fit of gpu's profiled type, byte rates scaled to gpu's own HBM bandwidth and FLOP rates to its peak."""
    fit = fit_profile(gpu.profile, gpu.network, root)
    ref = PROFILED_GPU[gpu.profile]
    return fit.scaled(gpu.peak_flops / ref.peak_flops, gpu.hbm_bandwidth / ref.hbm_bandwidth)


def leave_one_model_out(profile: str, root: str = DEFAULT_PROFILE_DIR) -> dict[str, FitError]:
    """GEMM law fitted without one model, scored on that model: how well shapes never seen are priced."""
    ops = [s for s in load_op_samples(profile, root) if s.op in GEMM_OPS]
    out = {}
    for model in sorted({s.model for s in ops}):
        law, _ = fit_ops([s for s in ops if s.model != model], use_flops=True)
        held = [s for s in ops if s.model == model]
        out[model] = FitError.of(np.array([law.time(s.flops, s.bytes) for s in held]),
                                 np.array([s.seconds for s in held]))
    return out
