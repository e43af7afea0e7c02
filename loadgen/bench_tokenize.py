"""What a prompt costs the ingress's one tokenizer thread before any limit on tokens can apply: the
demo tokenizer's encode time for prompts of the sizes aptray's limits allow (serve/limits.py): the
longest prompt's characters (RequestLimits.prompt_chars for the model's context), TRUNCATED_PROMPT_FACTOR
times that for a prompt to truncate (truncate_prompt_tokens), and the 1 MiB body limit's worth.

  python -m loadgen.bench_tokenize [--out docs/results] [--repeats 5]

Prints a table and writes tokenize_costs.json under --out (median of --repeats encodes each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from aptray.serve.args import AppArgs
from aptray.serve.limits import TRUNCATED_PROMPT_FACTOR, RequestLimits

TEXT = "The quick brown fox jumps over the lazy dog. "


def encode_seconds(tokenizer, chars: int, repeats: int) -> tuple[float, int]:
    """(median seconds, tokens) of encoding a prompt of chars characters."""
    prompt = (TEXT * (chars // len(TEXT) + 1))[:chars]
    times, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = len(tokenizer.encode(prompt))
        times.append(time.perf_counter() - start)
    return statistics.median(times), tokens


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from aptray.config import ModelSpec
    from aptray.model.demo import demo_model_dir, ensure_demo_model
    path = ensure_demo_model(demo_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        spec = ModelSpec.from_hf(json.load(f))
    context = spec.max_model_len
    longest = RequestLimits(context, spec.vocab_size).prompt_chars
    sizes = {"longest prompt": longest, "prompt to truncate": longest * TRUNCATED_PROMPT_FACTOR,
             "body limit": AppArgs().max_body_bytes}
    rows = []
    for name, chars in sizes.items():
        seconds, tokens = encode_seconds(tokenizer, chars, args.repeats)
        rows.append({"size": name, "chars": chars, "tokens": tokens, "encode_s": round(seconds, 4)})
        print(f"{name:20s} {chars:>9,} chars {tokens:>8,} tokens {seconds * 1e3:9.1f} ms")
    os.makedirs(args.out, exist_ok=True)
    record = {"command": "python -m loadgen.bench_tokenize", "date": time.strftime("%Y-%m-%d %H:%M"),
              "tokenizer": os.path.basename(path), "context": context, "rows": rows}
    with open(os.path.join(args.out, "tokenize_costs.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
