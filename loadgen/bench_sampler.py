"""What the sampler costs a step: aptray.model.sampler.sample over a batch of decode rows, for the
sampling controls clients send, each as a ratio to greedy rows of the same batch in the same run
(greedy is one argmax: the floor any sampler pays).

  python -m loadgen.bench_sampler [--rows 64 256] [--vocab 50272] [--device cpu|cuda] [--out DIR]
  python -m loadgen.bench_sampler --model $(aptray prepare-smollm2)

The logits are random (normal, times 3: flatter than a trained model's, so top-p's nucleus is
often past its candidates) or, with --model, a model's own next-token logits over ShareGPT prompts
(each position of the first prompts, teacher-forced). Prints a table (median ms per call over --iters
calls, and the ratio) and writes sampler_costs.json under --out when given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from aptray.model.sampler import sample
from aptray.plan import SeqPlan

CASES = {  # name -> SeqPlan fields beyond the defaults
    "greedy": {"temperature": 0.0},
    "temperature 1": {},
    "top_p 0.9": {"top_p": 0.9},
    "top_p 0.95": {"top_p": 0.95},
    "top_k 50": {"top_k": 50},
    "top_k 50, top_p 0.95": {"top_k": 50, "top_p": 0.95},
    "min_p 0.05": {"min_p": 0.05},
    "seeded": {"seed": 1},
}


def decode_row(i: int, **fields) -> SeqPlan:
    """Request i's decode row, sampled with fields beyond the defaults (temperature 1, no filters); a
    seed given is offset by i, so rows differ."""
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "seed": None, "min_p": 0.0}
    f = defaults | fields
    seed = None if f["seed"] is None else f["seed"] + i
    return SeqPlan(f"r{i}", (1,), 1, "kv", (0,), True, f["temperature"], f["top_p"], f["top_k"], seed, 0, f["min_p"])


def time_case(logits: torch.Tensor, fields: dict, iters: int) -> float:
    """Median seconds of one sample() call over the batch, every row asking for fields."""
    seqs = [decode_row(i, **fields) for i in range(logits.shape[0])]
    generator = torch.Generator(device=logits.device).manual_seed(0)
    sample(logits, seqs, generator)  # warm-up
    times = []
    for _ in range(iters):
        if logits.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(logits, seqs, generator)  # returns host lists: it waits for the device itself
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(logits: torch.Tensor, iters: int) -> list[dict]:
    """Each case over the batch of logits: median ms of one call and its ratio to greedy (the first case)
    in this same run."""
    rows, greedy = [], None
    for name, fields in CASES.items():
        seconds = time_case(logits, fields, iters)
        greedy = greedy or seconds
        rows.append({"rows": logits.shape[0], "case": name, "ms": seconds * 1e3, "x_greedy": seconds / greedy})
    return rows


def model_logits(path: str, rows: int) -> torch.Tensor:
    """rows next-token logits of the model at path (fp32), one per position of ShareGPT prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loadgen.datasets import load_samples
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out, have = [], 0
    with torch.inference_mode():
        for s in load_samples("sharegpt", tokenizer, 64, context=512, seed=0):
            ids = tokenizer(s.prompt, return_tensors="pt")["input_ids"][:, :256]
            out.append(model(ids).logits[0].float())
            have += len(out[-1])
            if have >= rows:
                break
    return torch.cat(out)[:rows]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=50272)  # OPT's
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="a model folder whose next-token logits to sample from")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    real = model_logits(args.model, max(args.rows)) if args.model else None
    vocab = real.shape[-1] if real is not None else args.vocab
    source, threads = args.model or "random", torch.get_num_threads()
    results = {"device": args.device, "vocab": vocab, "logits": source, "threads": threads, "cases": []}
    print(f"sampler on {args.device}, vocab {vocab}, {source} logits, {threads} threads")
    print(f"{'rows':>5} {'case':<22} {'ms':>8} {'x greedy':>9}")
    for rows in args.rows:
        logits = (real[:rows] if real is not None else
                  torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)).mul_(3)).to(args.device)
        for row in measure(logits, args.iters):
            results["cases"].append(row)
            print(f"{rows:>5} {row['case']:<22} {row['ms']:>8.2f} {row['x_greedy']:>9.1f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sampler_costs.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
