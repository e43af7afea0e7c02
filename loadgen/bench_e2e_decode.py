"""End-to-end decode tokens/s of a random-weight model: aptray vs transformers generate, same run.

GPU: OPT-13B shapes, fp16, one GPU:
  python -m loadgen.bench_e2e_decode --config aptray/sim/configs/opt-13b --dtype float16 --batch 32 64
CPU smoke run with a tiny shape:
  python -m loadgen.bench_e2e_decode --tiny --dtype float32 --batch 4 --prompt-len 32 --max-tokens 16
aptray runs each cache path (kv, hidden+absorbed, hidden+recompute) with random weights
(load_format="dummy"); transformers runs generate on the same shapes with random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from aptray.model.loader import DTYPES
from loadgen.scratch import scratch_dir


def _tiny_config() -> str:
    from transformers import OPTConfig
    path = scratch_dir("aptray-e2e-")
    OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4, vocab_size=512,
              max_position_embeddings=512, word_embed_proj_dim=64).save_pretrained(path)
    return path


def _aptray(path, dtype, mode, attention, batch, prompt_len, max_tokens) -> float:
    from aptray import LLM, SamplingParams
    llm = LLM(path, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, cache_mode=mode,
              hidden_attention=attention, max_num_seqs=batch, cache_memory_gb=float(os.environ.get("CACHE_GB", 20)))
    prompts = [{"prompt_token_ids": [(7 * i + j) % 1000 + 4 for j in range(prompt_len)]} for i in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm up
    start = time.perf_counter()
    llm.generate(prompts, sp)
    elapsed = time.perf_counter() - start
    del llm
    return batch * max_tokens / elapsed


def _transformers(path, dtype, batch, prompt_len, max_tokens, device) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=DTYPES[dtype]).to(device).eval()
    ids = torch.tensor([[(7 * i + j) % 1000 + 4 for j in range(prompt_len)] for i in range(batch)], device=device)
    kwargs = dict(do_sample=False, eos_token_id=10**9, pad_token_id=1)
    with torch.no_grad():
        model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=2, **kwargs)
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    return batch * max_tokens / elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="aptray/sim/configs/opt-13b", help="a folder with an HF config.json")
    p.add_argument("--tiny", action="store_true", help="use a tiny OPT config (CPU smoke run)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", default="results/e2e_decode.json")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = _tiny_config() if args.tiny else args.config
    rows = []
    for batch in args.batch:
        row = {"batch": batch, "transformers_tok_s": _transformers(path, args.dtype, batch, args.prompt_len,
                                                                   args.max_tokens, device)}
        for name, mode, attention in (("kv", "kv", "absorbed"), ("hidden_absorbed", "hidden", "absorbed"),
                                      ("hidden_recompute", "hidden", "recompute")):
            row[f"aptray_{name}_tok_s"] = _aptray(path, args.dtype, mode, attention, batch, args.prompt_len,
                                                  args.max_tokens)
            row[f"aptray_{name}_over_transformers"] = row[f"aptray_{name}_tok_s"] / row["transformers_tok_s"]
        rows.append({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        print(json.dumps(rows[-1]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": path,
                   "dtype": args.dtype, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
