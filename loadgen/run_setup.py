"""What a loadgen run is made of, from its parsed arguments: the engine config of each policy, the
client that replays the trace (simulator, in-process engine, or a server over HTTP or gRPC) and the
trace itself (a trace file, or a dataset sample cached on disk). The loadgen commands and the
results parts build their runs with it."""
from __future__ import annotations

import json
import os
import sys

DEFAULT_TOKENIZER = os.path.expanduser("~/.cache/aptray/tokenizers/sharegpt-bpe-50k")
TRACE_CACHE = os.path.expanduser("~/.cache/aptray/samples")  # dataset samples by (dataset, tokenizer, n, context, seed)
# Engine settings each policy is compared with unless --engine-arg overrides them.
POLICY_DEFAULTS = {
    "fcfs": {},
    "sarathi": {"enable_chunked_prefill": True},  # its token budget is learned online for the TBT SLO
    "apt": {"cache_mode": "auto"},  # the hybrid cache where it pays (r < 1), else KV
}


def parse_engine_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def model_dir(name: str, sim: bool) -> str:
    if sim and not os.path.isdir(name):
        from aptray.sim import configs_dir
        path = os.path.join(configs_dir(), name.lower())
        if not os.path.isdir(path):
            sys.exit(f"unknown simulated model {name!r}: give opt-13b, opt-30b, opt-66b or a folder with config.json")
        return path
    return name


def parse_policy(spec: str) -> tuple[str, str, dict]:
    """'fcfs' or 'label=policy:key=value:key=value' (a variant, e.g. apt-kv=apt:cache_mode=kv)."""
    label, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else (spec, "", spec)
    policy, *settings = rest.split(":")
    return label, policy, parse_engine_args(settings)


def config_factory(args, spec: str):
    from aptray.config import EngineConfig

    _, policy, variant = parse_policy(spec)
    kwargs = {**POLICY_DEFAULTS.get(policy, {}), **parse_engine_args(args.engine_arg), **variant}
    model = model_dir(args.model, args.sim)
    # sim-only: the sharded hidden cache at TP >= 2 (aptray.sim.runner.shard_hidden), not an EngineConfig field
    sharded = bool(kwargs.pop("sharded_hidden", False))
    if sharded and not args.sim:
        sys.exit("sharded_hidden is simulated only: the serving engine does not run it")
    pp = getattr(args, "pp", 1)

    wanted = kwargs.get("cache_mode", "hybrid")
    if sharded:  # replicated, the hidden cache cannot pay at TP >= 2: built as KV, then sharded
        kwargs["cache_mode"] = "auto"

    def make():
        config = EngineConfig(model=model, scheduler=policy, tensor_parallel_size=args.tp, pipeline_parallel_size=pp,
                              ttft_slo=args.ttft_slo, tbt_slo=args.tbt_slo, **kwargs)
        if sharded:
            from aptray.sim.hidden_sharding import shard_hidden
            shard_hidden(config, "hybrid" if wanted == "auto" else wanted)
        return config
    return make


def make_client(args, policy: str):
    from loadgen.clients import GrpcStreamClient, HttpStreamClient, InProcessEngineClient, SimClient

    if getattr(args, "pp", 1) != 1 and not args.sim:
        sys.exit("--pp is simulated only: the serving engine runs one pipeline stage")
    if getattr(args, "url", None) or getattr(args, "grpc", None):
        if args.sim:
            sys.exit("--sim replays on the simulator; --url/--grpc on a running server: pick one")
        if args.grpc:
            return GrpcStreamClient(args.grpc, args.ttft_slo, args.tbt_slo, api_key=args.api_key,
                                    metrics_url=args.metrics_url)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        return HttpStreamClient(args.url, args.ttft_slo, args.tbt_slo, headers=headers)
    factory = config_factory(args, policy)
    if args.sim:
        scale = None if args.decision_time == "none" else args.decision_scale
        return SimClient(factory, args.gpu, args.step_overhead, args.ttft_slo, args.tbt_slo,
                         stop_when_decided=not args.full_drain, calibration=args.calibration, decision_scale=scale,
                         replicas=args.replicas, routing=args.routing, shed_unmeetable=args.shed_unmeetable,
                         stats_period_s=args.stats_period, stats_lag_s=args.stats_lag)

    def engine_factory():
        from aptray.engine import Engine
        from aptray.executor.local import LocalExecutor
        config = factory()
        return Engine(config, LocalExecutor(config))
    return InProcessEngineClient(engine_factory, None, args.ttft_slo, args.tbt_slo, args.seed)


def context_of(args) -> int:
    if args.context:
        return args.context
    from aptray.config import ModelSpec
    name = getattr(args, "model", "opt-13b")
    # a remote server's model may be no folder here: then a simulator config of that name caps lengths
    sim = getattr(args, "sim", True) or not os.path.isdir(name)
    return ModelSpec.from_path(model_dir(name, sim)).max_model_len


def get_tokenizer(path: str):
    from loadgen.datasets import load_tokenizer

    if path == DEFAULT_TOKENIZER and not os.path.isdir(path):
        from loadgen.tokenizer import sharegpt_texts, train_bpe_tokenizer
        print(f"training the default tokenizer into {path} (once, ~15 s)", file=sys.stderr)
        train_bpe_tokenizer(path, list(sharegpt_texts(4000)))
    return load_tokenizer(path)


DEFAULT_DATASET_REQUESTS = 2000


def base_trace(args, rate: float = 1.0):
    """The run's requests: a given trace file (its first --num-requests, after --length-filter), or a
    dataset sample (cached on disk: tokenising is slow)."""
    import hashlib

    from loadgen.datasets import LENGTH_RULE, load_samples
    from loadgen.samples import Sample
    from loadgen.traces import make_trace, read_trace, write_trace

    if args.trace:
        return trace_sample(args, read_trace(args.trace))
    context = context_of(args)
    num = args.num_requests or DEFAULT_DATASET_REQUESTS
    key = f"{args.dataset}|{os.path.abspath(args.tokenizer)}|{num}|{context}|{args.seed}|{LENGTH_RULE}"
    cache = os.path.join(TRACE_CACHE, hashlib.sha1(key.encode()).hexdigest()[:16] + ".jsonl")
    if os.path.isfile(cache):
        # in sample order, as make_trace numbered them (read_trace sorts by arrival: follow-ups interleave)
        cached = sorted(read_trace(cache), key=lambda r: int(r.request_id.removeprefix("req-")))
        samples = [Sample(r.prompt or "", r.num_prefill_tokens, r.num_decode_tokens, r.conversation,
                          shared_prefix=r.shared_prefix) for r in cached]
    else:
        samples = load_samples(args.dataset, get_tokenizer(args.tokenizer), num, context, args.seed)
        os.makedirs(TRACE_CACHE, exist_ok=True)
        write_trace(cache, make_trace(samples, 1.0, 1.0, 0, keep_prompts=True))
    return make_trace(samples, rate, args.cv, args.seed, keep_prompts=getattr(args, "keep_prompts", False),
                      think_time=getattr(args, "think_time", None))


def trace_sample(args, rows):
    """A trace's rows as the run takes them, and a line on stderr saying what was taken: vLLM's length
    filter if asked, then the first --num-requests by arrival; rows over the context are counted (the
    server refuses or cuts them; summaries report them apart)."""
    from loadgen.datasets import fits_context

    context = context_of(args)
    kept = [r for r in rows if fits_context(r.num_prefill_tokens, r.num_decode_tokens, context)] \
        if getattr(args, "length_filter", "none") == "vllm" else rows
    taken = kept[:args.num_requests] if args.num_requests else kept
    over = sum(r.num_prefill_tokens + r.num_decode_tokens > context for r in taken)
    print(f"trace {args.trace}: {len(taken)} of {len(rows)} rows"
          + (f" ({len(rows) - len(kept)} dropped by vLLM's length filter)" if len(kept) < len(rows) else "")
          + (f"; {over} over the {context}-token context (misses, reported apart)" if over else ""), file=sys.stderr)
    return taken
