"""The real CPU engine for docs/RESULTS.md: fcfs vs sarathi vs apt (KV, hybrid) on one machine, one run.

Tiny random multi-head OPT (d 128, 4 layers, 8 heads: r = 1/2), a cache pool that binds, lengths
from the real datasets (ShareGPT, HumanEval; the default tokenizer) capped to the 512-token
context, Gamma arrivals at CV 1 and 4, SLOs scaled to the decode step time measured at the start
of the run (DistServe's ratios to an OPT-13B decode step of ~20 ms: chat TTFT 12.5 steps, TBT 5;
code TTFT 6.25, TBT 10). Every policy replays the same requests at each rate, interleaved, so
that machine noise hits all policies alike; ratios are taken within the run.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

CONTEXT = 512
BLOCK_SIZE = 16
NUM_BLOCKS = 160  # 2,560 tokens of KV: ~6 ShareGPT or ~14 HumanEval requests at once
POLICIES = {  # label -> (scheduler, EngineConfig overrides)
    "fcfs": ("fcfs", {"cache_mode": "kv"}),
    "sarathi": ("sarathi", {"cache_mode": "kv", "enable_chunked_prefill": True}),
    "apt-kv": ("apt", {"cache_mode": "kv"}),
    "apt-hybrid": ("apt", {"cache_mode": "hybrid"}),
}
SLO_STEPS = {"sharegpt": (12.5, 5.0), "humaneval": (6.25, 10.0)}  # (TTFT, TBT) in decode steps


def tiny_opt() -> str:
    from aptray.model.factory import make_tiny_model
    return make_tiny_model(os.path.join(tempfile.mkdtemp(prefix="aptray-results-"), "opt"), arch="opt",
                           hidden_size=128, num_layers=4, num_heads=8, max_positions=CONTEXT)


def engine_factory(model: str, label: str, ttft: float, tbt: float):
    from aptray.config import EngineConfig
    from aptray.engine import Engine
    from aptray.executor.local import LocalExecutor
    policy, extra = POLICIES[label]

    def make():
        config = EngineConfig(model=model, scheduler=policy, block_size=BLOCK_SIZE, num_cache_blocks=NUM_BLOCKS,
                              max_num_seqs=64, max_num_batched_tokens=CONTEXT, ttft_slo=ttft, tbt_slo=tbt, **extra)
        return Engine(config, LocalExecutor(config))
    return make


def decode_step_time(model: str) -> float:
    """Median step time of a 16-request decode batch (fcfs, KV): the unit the SLOs are scaled by."""
    from aptray.sampling_params import SamplingParams
    engine = engine_factory(model, "fcfs", 1e9, 1e9)()
    rng = np.random.default_rng(99)
    for i in range(16):
        engine.add_request(str(i), rng.integers(4, 500, 64).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        engine.step()
        if engine.last_result is not None and len(engine.scheduler.running) == 16:
            times.append(engine.last_result.step_time)
    return float(np.median(times))


def dataset_trace(dataset: str, num_requests: int, seed: int = 0):
    from loadgen.cli import base_trace, build_parser
    args = build_parser().parse_args(["trace", "--dataset", dataset, "--num-requests", str(num_requests),
                                      "--context", str(CONTEXT), "--seed", str(seed), "--out", "unused"])
    return base_trace(args)


def run(datasets, cvs, rates_by_dataset: dict, num_requests: int, log=print) -> dict:
    """Every (dataset, CV, rate): every policy on the same trace, in an order that rotates per rate."""
    import torch

    from loadgen.clients import InProcessEngineClient
    from loadgen.metrics import summarize
    from loadgen.traces import rescale
    torch.set_num_threads(1)
    model = tiny_opt()
    step = decode_step_time(model)
    log(f"decode step (16 requests) {1e3 * step:.2f} ms")
    out = {"decode_step_s": step, "num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "context": CONTEXT,
           "num_requests": num_requests, "runs": []}
    labels = list(POLICIES)
    for dataset in datasets:
        ttft, tbt = (k * step for k in SLO_STEPS[dataset])
        base = dataset_trace(dataset, num_requests)
        for cv in cvs:
            for k, rate in enumerate(rates_by_dataset[dataset]):
                trace = rescale(base, rate, cv, seed=0)
                for label in labels[k % len(labels):] + labels[:k % len(labels)]:
                    client = InProcessEngineClient(engine_factory(model, label, ttft, tbt), None, ttft, tbt,
                                                   seed=0, timeout=30.0)
                    c0, w0 = time.process_time(), time.monotonic()
                    res = client.run(trace)
                    s = summarize(res.records, res.duration)
                    row = {"dataset": dataset, "cv": cv, "rate": rate, "policy": label, "ttft_slo": ttft,
                           "tbt_slo": tbt, "attainment": s["attainment"], "goodput_rps": s["goodput_rps"],
                           "preemptions": s["preemptions"], "stats": res.info.get("scheduler_stats", {}),
                           "wall_s": time.monotonic() - w0, "cpu_s": time.process_time() - c0}
                    out["runs"].append(row)
                    log(f"{dataset:9s} cv {cv:g} rate {rate:6.1f} {label:11s} attainment {row['attainment']:.3f} "
                        f"preemptions {row['preemptions']:4d} wall {row['wall_s']:.1f}s cpu {row['cpu_s']:.1f}s")
    return out
