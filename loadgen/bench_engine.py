"""Engine benchmarks: offline throughput vs transformers, cache capacity, decode step time.

  python -m loadgen.bench_engine offline  [--num-requests 64] [--max-output 256]
  python -m loadgen.bench_engine capacity
  python -m loadgen.bench_engine decode   [--contexts 128 512 2048]
  python -m loadgen.bench_engine absorbed [--repeats 50]
  python -m loadgen.bench_engine profile  [--batch 64]
  python -m loadgen.bench_engine logprobs [--batch 32] [--max-prompt 512]
  python -m loadgen.bench_engine structured [--batch 32] [--max-output 64]
  python -m loadgen.bench_engine churn    [--num-requests 800] [--rounds 3]
Each prints a table and writes JSON under --out (default results/).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from loadgen.scratch import scratch_dir


def _save(out_dir: str, name: str, data: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)
    print(json.dumps(data, indent=2))


def offline(args) -> dict:
    """SmolLM2, ShareGPT lengths: aptray's continuous batching vs transformers generate, batched and padded."""
    from transformers import AutoModelForCausalLM

    from aptray import LLM, SamplingParams
    from aptray.smollm2 import prepare_smollm2
    from loadgen.datasets import load_samples

    path = prepare_smollm2()
    llm = LLM(path, cache_memory_gb=2.0, max_num_seqs=args.num_requests)
    tok = llm.tokenizer
    samples = load_samples("sharegpt", tok, args.num_requests, context=args.max_prompt + args.max_output, seed=0)
    prompts = [tok(s.prompt, add_special_tokens=False)["input_ids"][:args.max_prompt] for s in samples]
    outputs = [min(s.output_len, args.max_output) for s in samples]
    useful = sum(outputs)

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok.padding_side = "left"

    def run_aptray():
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs])

    def run_hf(batch):
        for i in range(0, len(prompts), batch):
            enc = tok.pad({"input_ids": prompts[i:i + batch]}, return_tensors="pt")
            with torch.inference_mode():
                hf.generate(**enc, max_new_tokens=max(outputs[i:i + batch]), do_sample=False,
                            eos_token_id=10**9, pad_token_id=tok.pad_token_id)

    # Rounds interleave aptray and every transformers batch size, so load from other jobs on the
    # shared machine falls on both sides; each side keeps its best round. CPU seconds as well as
    # wall seconds: other jobs stretch wall time.
    runs = [("aptray", run_aptray)] + [(b, lambda b=b: run_hf(b)) for b in args.hf_batch_sizes]
    wall, cpu = {name: [] for name, _ in runs}, {name: [] for name, _ in runs}
    for r in range(args.rounds):
        for name, fn in runs:
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            print(f"round {r}: {name if name == 'aptray' else f'transformers batch {name}'}: "
                  f"{wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True)
    per_round = {str(name): {"wall_s": [round(x, 2) for x in wall[name]], "cpu_s": [round(x, 2) for x in cpu[name]]}
                 for name, _ in runs}
    ours, ours_cpu = min(wall.pop("aptray")), min(cpu.pop("aptray"))
    hf_times = {b: min(v) for b, v in wall.items()}
    hf_cpu = {b: min(v) for b, v in cpu.items()}
    best = min(hf_cpu, key=hf_cpu.get)
    result = {
        "model": "SmolLM2-135M-Instruct fp32 CPU", "num_requests": len(prompts), "output_tokens": useful,
        "prompt_tokens": sum(map(len, prompts)), "threads": torch.get_num_threads(), "rounds": args.rounds,
        "aptray_s": round(ours, 2), "aptray_tok_s": round(useful / ours, 1),
        "transformers_s_by_batch": {b: round(s, 2) for b, s in hf_times.items()},
        "transformers_best_tok_s": round(useful / hf_times[best], 1), "transformers_best_batch": best,
        "speedup_vs_best_transformers": round(hf_times[best] / ours, 2),
        "aptray_cpu_s": round(ours_cpu, 2), "transformers_cpu_s_by_batch": {b: round(s, 2) for b, s in hf_cpu.items()},
        "cpu_time_speedup_vs_best_transformers": round(hf_cpu[best] / ours_cpu, 2),
        "per_round": per_round,
    }
    _save(args.out, "offline_throughput", result)
    return result


def capacity(args) -> dict:
    """Same cache budget, same requests: how many run at once with KV vs with the hidden cache."""
    from aptray import LLM, SamplingParams
    from aptray.model.factory import make_tiny_model

    path = make_tiny_model(scratch_dir() + "/opt", "opt", hidden_size=64, num_layers=2, num_heads=4,
                           max_positions=1024)
    result = {"model": "tiny OPT d=64 (MHA, r=0.5)", "num_cache_blocks": args.blocks, "block_size": 16}
    for mode in ("kv", "hidden"):
        llm = LLM(path, cache_mode=mode, num_cache_blocks=args.blocks, block_size=16, max_num_seqs=1024)
        eng = llm.engine
        for i in range(args.requests):
            eng.add_request(str(i), [3] + [5 + i % 400] * 127, SamplingParams(max_tokens=128, ignore_eos=True))
        peak, total, steps = 0, 0, 0
        while eng.has_unfinished():
            eng.step()
            peak = max(peak, len(eng.scheduler.running))
            total += len(eng.scheduler.running)
            steps += 1
        result[mode] = {"peak_running": peak, "mean_running": round(total / steps, 1), "steps": steps,
                        "preemptions": eng.scheduler.stats["preemptions"]}
    result["peak_ratio_hidden_over_kv"] = round(result["hidden"]["peak_running"] / result["kv"]["peak_running"], 2)
    _save(args.out, "capacity", result)
    return result


def decode(args) -> dict:
    """Decode step time per request at fixed context, for each cache path (one OPT-125m-shaped layer stack)."""
    from aptray.config import EngineConfig
    from aptray.model.factory import make_tiny_model
    from aptray.plan import BatchPlan, SeqPlan
    from aptray.worker.model_runner import ModelRunner

    ctx_max = max(args.contexts)
    path = make_tiny_model(scratch_dir() + "/opt", "opt", hidden_size=768, num_layers=2, num_heads=12,
                           max_positions=ctx_max + 16, vocab_size=512)
    rows = []
    for name, mode, attention in (("kv", "kv", "absorbed"), ("hidden-absorbed", "hidden", "absorbed"),
                                  ("hidden-recompute", "hidden", "recompute")):
        for ctx in args.contexts:
            cfg = EngineConfig(path, cache_mode=mode, hidden_attention=attention, block_size=16,
                               num_cache_blocks=args.batch * (ctx // 8 + 2))
            runner = ModelRunner(cfg)
            per = cfg.block_size if mode == "kv" else cfg.hidden_block_size
            nblk = -(-ctx // per)
            tables = [tuple(range(i * nblk, (i + 1) * nblk)) for i in range(args.batch)]
            seqs = tuple(SeqPlan(str(i), (7,), ctx - 1, mode, tables[i], True) for i in range(args.batch))
            plan = BatchPlan(1, seqs)
            runner.execute(plan)  # warm up (cache contents do not matter for timing)
            times = []
            for _ in range(args.repeats):
                times.append(runner.execute(plan).step_time)
            ms = sorted(times)[len(times) // 2] * 1000 / args.batch
            rows.append({"path": name, "context": ctx, "ms_per_request": round(ms, 3)})
            print(f"{name:18s} ctx={ctx:5d}  {ms:8.3f} ms/request")
    result = {"model": "OPT-125m-shaped, 2 layers, fp32 CPU", "batch": args.batch, "rows": rows}
    _save(args.out, "decode_step", result)
    return result


def _step_until_decoding(engine, tokens: int) -> None:
    """Steps through every request's prefill and on until each has `tokens` output tokens: what is timed
    next is decode steps alone."""
    while engine.scheduler.waiting or any(len(r.output_token_ids) < tokens for r in engine.scheduler.running):
        engine.step()


def absorbed(args) -> dict:
    """Decode steps of the whole engine (fcfs), KV against the hidden cache with absorbed attention, on
    the CPU results' model shape (d 128, 4 layers) with 2 heads of 64 and with 8 heads of 16 (whose
    absorbed FLOPs are 8x KV's): --batch requests of 150-350 context tokens, the mean of --repeats
    decode steps in the engine thread's CPU time."""
    from aptray import LLM, SamplingParams
    from aptray.model.factory import make_tiny_model

    rows = []
    for heads in (2, 8):
        path = make_tiny_model(scratch_dir() + f"/opt-{heads}", "opt", hidden_size=128, num_layers=4,
                               num_heads=heads, max_positions=1024)
        for mode in ("kv", "hidden"):
            engine = LLM(path, cache_mode=mode, hidden_attention="absorbed", num_cache_blocks=512,
                         max_num_seqs=args.batch).engine
            for i in range(args.batch):
                prompt = [5 + (7 * i + j) % 400 for j in range(150 + 200 * i // max(args.batch - 1, 1))]
                engine.add_request(str(i), prompt, SamplingParams(max_tokens=args.repeats + 4, ignore_eos=True))
            _step_until_decoding(engine, 2)
            times = []
            for _ in range(args.repeats):
                start = time.thread_time()
                engine.step()
                times.append(time.thread_time() - start)
            ms = sum(times) / len(times) * 1000
            rows.append({"heads": f"{heads} x {128 // heads}", "cache": mode, "ms_per_step": round(ms, 2)})
            print(f"{heads} heads of {128 // heads:3d}  {mode:7s} {ms:7.2f} ms per decode step")
    result = {"model": "tiny OPT d=128, 4 layers, fp32 CPU", "batch": args.batch, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "rows": rows}
    _save(args.out, "absorbed_decode_step", result)
    return result


def profile(args) -> dict:
    """Where a SmolLM2 decode step's time goes: --batch greedy requests at a context of about 280 tokens,
    torch.profiler over --repeats steps; each op's share of the operators' self CPU time, by kind,
    and the GEMMs' rate (the profiler's FLOP counts over their time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from aptray import LLM, SamplingParams
    from aptray.smollm2 import prepare_smollm2

    engine = LLM(prepare_smollm2(), cache_memory_gb=2.0, max_num_seqs=args.batch).engine
    for i in range(args.batch):
        engine.add_request(str(i), [100 + (11 * i + j) % 4000 for j in range(272)],
                           SamplingParams(temperature=0.0, max_tokens=args.repeats + 10, ignore_eos=True))
    _step_until_decoding(engine, 8)
    with torch_profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(args.repeats):
            engine.step()
    kinds = {"gemm": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
             "sdpa": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
             "gather": ("aten::index", "aten::index_select", "aten::gather", "aten::embedding")}
    self_us, gemm_flops, gemm_us = {}, 0, 0.0
    for e in prof.key_averages():
        kind = next((k for k, names in kinds.items() if e.key.startswith(names)), "other")
        self_us[kind] = self_us.get(kind, 0.0) + e.self_cpu_time_total
        if kind == "gemm":
            gemm_flops += e.flops
            gemm_us += e.self_cpu_time_total
    total = sum(self_us.values())
    shares = {kind: round(us / total, 3) for kind, us in sorted(self_us.items(), key=lambda kv: -kv[1])}
    result = {"model": "SmolLM2-135M-Instruct fp32 CPU", "batch": args.batch, "context": "about 280",
              "threads": torch.get_num_threads(), "steps": args.repeats, "share_of_self_cpu_time": shares,
              "gemm_gflop_per_s": round(gemm_flops / gemm_us / 1e3, 1) if gemm_us else None}
    _save(args.out, "decode_profile", result)
    return result


def logprobs(args) -> dict:
    """What log-probabilities add to a step of SmolLM2 (vocabulary 49,152): a decode step of --batch
    requests asking for none, 0, 5 or 20 top tokens, and a --max-prompt-token prefill with and without
    prompt_logprobs. The cases alternate within each repeat; each keeps its median."""
    from aptray.config import EngineConfig
    from aptray.plan import BatchPlan, SeqPlan
    from aptray.smollm2 import prepare_smollm2
    from aptray.worker.model_runner import ModelRunner

    ctx, n, prompt = 256, args.batch, args.max_prompt
    per = ctx // 16 + 1  # blocks per decoding request
    runner = ModelRunner(EngineConfig(prepare_smollm2(), block_size=16, num_cache_blocks=n * per + prompt // 16 + 1))
    ids, table = tuple(range(100, 100 + prompt)), tuple(range(n * per, n * per + prompt // 16 + 1))

    def decode(k):
        return BatchPlan(1, tuple(SeqPlan(str(i), (7,), ctx - 1, "kv", tuple(range(i * per, (i + 1) * per)), True,
                                          logprobs=k) for i in range(n)))

    def prefill(k):
        targets = ids[1:] if k is not None else ()
        return BatchPlan(1, (SeqPlan("p", ids, 0, "kv", table, True, prompt_logprobs=k, prompt_targets=targets),))

    cases = {("decode", k): decode(k) for k in (None, 0, 5, 20)}
    cases.update({("prefill", k): prefill(k) for k in (None, 1)})
    times = {case: [] for case in cases}
    for plan in cases.values():
        runner.execute(plan)  # warm up
    for _ in range(args.repeats):
        for case, plan in cases.items():
            times[case].append(runner.execute(plan).step_time)
    ms = {case: sorted(t)[len(t) // 2] * 1000 for case, t in times.items()}
    rows = []
    for (kind, k), value in ms.items():
        name = f"decode x{n}, logprobs {k}" if kind == "decode" else f"prefill {prompt}, prompt_logprobs {k}"
        ratio = value / ms[(kind, None)]
        rows.append({"case": name, "ms_per_step": round(value, 2), "ratio_to_none": round(ratio, 3)})
        print(f"{name:36s} {value:9.2f} ms  x{ratio:.3f}")
    result = {"model": "SmolLM2-135M-Instruct fp32 CPU", "context": ctx, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "rows": rows}
    _save(args.out, "logprobs_cost", result)
    return result


def structured(args) -> dict:
    """What structured outputs add to generation with SmolLM2 (vocabulary 49,152): --batch greedy
    requests of --max-output tokens each, free (EOS ignored), held to a regex, and held to a JSON
    schema, each structure long enough that every request runs to --max-output. Wall time of the
    whole generate (the engine thread's bitmasks, the plans carrying them, the sampler's masking);
    the cases alternate within each repeat; each keeps its median."""
    from aptray import LLM, SamplingParams
    from aptray.smollm2 import prepare_smollm2
    from aptray.structured_output import StructuredOutput

    n, out = args.batch, args.max_output
    llm = LLM(prepare_smollm2(), cache_memory_gb=1.0, max_num_seqs=n)
    prompts = [f"Write a short note about the number {i}:" for i in range(n)]
    schema = {"type": "object", "properties": {"note": {"type": "string", "minLength": 4000}}, "required": ["note"]}
    cases = {"free": SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True),
             "regex": SamplingParams(temperature=0.0, max_tokens=out,
                                     structured_output=StructuredOutput("regex", "[a-z ,.]{4000}")),
             "json schema": SamplingParams(temperature=0.0, max_tokens=out,
                                           structured_output=StructuredOutput("json", json.dumps(schema)))}
    times = {case: [] for case in cases}
    for sp in cases.values():
        llm.generate(prompts[:2], sp, use_tqdm=False)  # warm up (and compile)
    for _ in range(args.repeats):
        for case, sp in cases.items():
            start = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            times[case].append(time.perf_counter() - start)
            assert all(len(o.outputs[0].token_ids) == out for o in outs), case
    s = {case: sorted(t)[len(t) // 2] for case, t in times.items()}
    rows = []
    for case, value in s.items():
        rows.append({"case": case, "seconds": round(value, 3), "ratio_to_free": round(value / s["free"], 3)})
        print(f"{case:12s} {value:8.3f} s  x{value / s['free']:.3f}")
    result = {"model": "SmolLM2-135M-Instruct fp32 CPU", "batch": n, "max_output": out,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
    _save(args.out, "structured_output_cost", result)
    return result


def churn(args) -> dict:
    """The soak's load through the offline engine, where the decode set changes nearly every step: the
    demo model (or a tiny OPT of --hidden-size and --layers), --num-requests greedy requests of
    loadgen.soak's prompts with 16-64 output tokens, max_num_seqs 32. Each round runs the whole load
    with the CPU decode mirrors (aptray_kernels.cpu_mirror) and without them, in turn; each side keeps
    its best round, in output tokens per CPU second of the process. --steady: 32 requests of one prompt
    and --max-output tokens each, all running from the start, so the decode set holds throughout."""
    import numpy as np

    from aptray import LLM, SamplingParams
    from aptray.model.demo import DEMO_MODEL, resolve_model_path
    from aptray.model.factory import make_tiny_model
    from loadgen.soak import PROMPTS

    name = DEMO_MODEL if args.hidden_size is None else f"tiny OPT d={args.hidden_size}, {args.layers} layers"
    path = (resolve_model_path(DEMO_MODEL) if args.hidden_size is None else
            make_tiny_model(scratch_dir() + f"/churn-{args.hidden_size}-{args.layers}", "opt",
                            hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, max_positions=512))
    llm = LLM(path, num_cache_blocks=1024 if args.steady else 256, max_num_seqs=32)  # steady: none preempted
    runner = llm.engine.executor.runner
    mirrors = (runner.kv_mirror, runner.hidden_mirror)
    n = 32 if args.steady else args.num_requests
    lengths = ([args.max_output] * n if args.steady else np.random.default_rng(1).integers(16, 65, size=n))
    prompts = [PROMPTS[0] if args.steady else PROMPTS[i % len(PROMPTS)] for i in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True) for m in lengths]
    llm.generate(prompts[:64], params[:64])  # warm-up
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for side in ("mirror", "plain"):
            runner.kv_mirror, runner.hidden_mirror = mirrors if side == "mirror" else (None, None)
            start = time.process_time()
            outs = llm.generate(prompts, params)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rate = tokens / (time.process_time() - start)
            best[side] = max(best.get(side, 0.0), rate)
            print(f"round {r + 1} {side:6s} {rate:8.0f} output tokens per CPU second")
    result = {"model": name, "requests": n, "steady": args.steady, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "tokens_per_cpu_s": {k: round(v) for k, v in best.items()},
              "mirror_over_plain": round(best["mirror"] / best["plain"], 3)}
    _save(args.out, "churn", result)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["offline", "capacity", "decode", "absorbed", "profile", "logprobs", "structured",
                                      "churn"])
    p.add_argument("--out", default="results")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--rounds", type=int, default=1, help="offline, churn: interleaved rounds, best of each side")
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hidden-size", type=int, default=None,
                   help="churn: a tiny OPT this wide (default: the demo model)")
    p.add_argument("--layers", type=int, default=2, help="churn: its layers")
    p.add_argument("--steady", action="store_true", help="churn: 32 requests decoding together throughout")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("APTRAY_THREADS", "2")))
    {"offline": offline, "capacity": capacity, "decode": decode, "absorbed": absorbed, "profile": profile,
     "logprobs": logprobs, "structured": structured, "churn": churn}[args.what](args)


if __name__ == "__main__":
    main()
