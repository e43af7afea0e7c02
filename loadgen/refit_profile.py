"""Fit a measured step-cost profile again over the step medians it stores, with the current cost model.

    python -m loadgen.refit_profile docs/results/gpu/h100-80gb.json [--out refit.json]

A profile (loadgen.gpu_check's <gpu>.json) keeps the shapes and median times of the steps it was fitted
to (meta["steps"]) and the engine's host time around the runner (meta["host_outside_runner"]), so a cost
model that gained a term (HardwareFit.hidden_layer_overhead) can be fitted to the same measurements
without the device. Prints |pred/measured - 1| by kind of step for the stored fit and the refit, and the
refit's hidden-layer term; --out writes the refit, host time added back as gpu_check adds it.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np

from aptray.config import EngineConfig
from aptray.sim import configs_dir
from aptray.sim.calibrate import GPU_X0, Calibration, StepSample, fit_steps, predict


def kind_of(seqs) -> str:
    """prefill, mixed, decode_kv, decode_hidden or decode_both, as gpu_check names its points."""
    chunks = any(n > 1 for _, n, _, _ in seqs)
    decodes = {k for k, n, _, _ in seqs if n == 1}
    if chunks:
        return "mixed" if decodes else "prefill"
    return "decode_both" if len(decodes) > 1 else f"decode_{decodes.pop()}"


def errors(shapes, config, hw, overhead) -> dict:
    """|pred/measured - 1|: mean over all and by kind of step."""
    rel = np.abs(predict(shapes, config, hw, overhead) / np.array([s.seconds for s in shapes]) - 1)
    by: dict = {}
    for s, r in zip(shapes, rel):
        by.setdefault(kind_of(s.seqs), []).append(r)
    return {"all": float(rel.mean()), **{k: float(np.mean(v)) for k, v in by.items()}}


def refit(path: str) -> tuple[Calibration, dict, dict]:
    """(the refit with host time added back, the stored fit's errors, the refit's errors), both on the runner
    steps the profile was fitted to."""
    old = Calibration.load(path)
    meta, host = old.meta, old.meta["host_outside_runner"]
    shapes = [StepSample([tuple(x) for x in seqs], [], float(t)) for seqs, t in meta["steps"]]
    config = EngineConfig(model=os.path.join(configs_dir(), meta["model"]), dtype=meta["dtype"], load_format="dummy",
                          skip_tokenizer_init=True, block_size=meta["block_size"], cache_mode="hybrid",
                          hidden_attention="absorbed", num_cache_blocks=64)
    # the stored fit carries the host time around the runner: take it off to compare like for like
    stored_hw = replace(old.hardware, seq_overhead=old.hardware.seq_overhead - host["per_seq_s"])
    before = errors(shapes, config, stored_hw, old.step_overhead - host["per_step_s"])
    new = fit_steps(shapes, config, GPU_X0, profile=old.hardware.profile)
    after = errors(shapes, config, new.hardware, new.step_overhead)
    new.step_overhead += host["per_step_s"]
    new.hardware = replace(new.hardware, seq_overhead=new.hardware.seq_overhead + host["per_seq_s"],
                           step_jitter=old.hardware.step_jitter)
    new.meta = {**meta, "refit_of": os.path.basename(path)}
    return new, before, after


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    new, before, after = refit(a.profile)
    print("| fit | " + " | ".join(before) + " |")
    print("|" + " --- |" * (len(before) + 1))
    for name, e in (("stored", before), ("refit", after)):
        print(f"| {name} | " + " | ".join(f"{100 * e.get(k, float('nan')):.1f}%" for k in before) + " |")
    layers = EngineConfig(model=os.path.join(configs_dir(), new.meta["model"])).spec.num_layers
    term = new.hardware.hidden_layer_overhead
    print(f"hidden_layer_overhead {1e3 * term:.3f} ms per layer, {1e3 * layers * term:.1f} ms a step over {layers} layers")
    if a.out:
        new.save(a.out)


if __name__ == "__main__":
    main()
