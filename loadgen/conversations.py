"""Multi-turn chat workloads: ShareGPT conversations replayed turn by turn.

Turn k of a conversation sends the whole conversation so far (a system prompt every conversation
shares, in the -system variant; each earlier user message and the assistant's reply) plus
the k-th user message, and asks for as many tokens as the recorded k-th reply. Lengths are in the
given tokenizer's tokens, kept by vLLM's rule scaled to the context: a conversation ends before the
first turn whose prompt passes half the context, whose prompt and reply pass the context, or whose
first message or reply has fewer than 4 tokens (later turns would resend it).

Token content is synthetic (aptray.sim.prompt_ids): turn k's prompt is the first prompt-length ids of
its conversation's stream (after the shared system prompt), so conversations share nothing but the
system prompt. The next turn is sent think_time after the previous one ends (loadgen.traces,
aptray.sim.arrivals). Every replay (the simulator, the in-process engine, gRPC, HTTP with
return_token_ids) resends the reply's token ids, as a chat client resends what the assistant said:
turn k's prompt is turn k-1's prompt, the reply it got and the rest of the stream
(aptray.sim.prompt_ids.follow_up_ids).
"""
from __future__ import annotations

import numpy as np

from loadgen.samples import Sample, sharegpt_conversations

MULTITURN = "sharegpt-multiturn"
MULTITURN_SYSTEM = "sharegpt-multiturn-system"  # the same, every conversation opening with one system prompt
DEFAULT_THINK_S = 5.0  # mean think time between a turn's end and the next turn (exponential)


def system_prompt_len(context: int) -> int:
    """The shared system prompt's tokens: an eighth of the context (256 at OPT's 2,048)."""
    return context // 8


def _pairs(conversation: list[dict]) -> list[tuple[str, str]]:
    """(user, reply) texts while the messages alternate human, gpt."""
    out = []
    for user, reply in zip(conversation[::2], conversation[1::2]):
        if user.get("from") != "human" or reply.get("from") != "gpt":
            break
        out.append((user["value"], reply["value"]))
    return out


def turns_within(user_lens: list[int], reply_lens: list[int], context: int, shared_prefix: int = 0,
                 min_len: int = 4) -> list[tuple[int, int]]:
    """(prompt, output) lengths of the turns kept (module doc)."""
    out, history = [], shared_prefix
    for k, (u, r) in enumerate(zip(user_lens, reply_lens)):
        prompt = history + u
        if (k == 0 and u < min_len) or r < min_len or prompt > context // 2 or prompt + r > context:
            break
        out.append((prompt, r))
        history = prompt + r
    return out


def load_chat_samples(tokenizer, num_requests: int, context: int, seed: int = 0, shared_prefix: int = 0,
                      min_len: int = 4) -> list[Sample]:
    """Turns of conversations drawn without replacement (then from a fresh shuffle), in conversation
    order, until num_requests turns; the last conversation is cut there."""
    conversations = [p for p in map(_pairs, sharegpt_conversations()) if p]
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    rounds = 0
    while len(out) < num_requests:
        before = len(out)
        order = rng.permutation(len(conversations))
        for start in range(0, len(order), 64):
            batch = [conversations[i] for i in order[start:start + 64]]
            texts = [t for conv in batch for pair in conv for t in pair]
            lens = iter(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
            for conv in batch:
                pair_lens = [(next(lens), next(lens)) for _ in conv]
                turns = turns_within([u for u, _ in pair_lens], [r for _, r in pair_lens], context, shared_prefix,
                                     min_len)
                name = f"conv-{rounds}-{len(out)}"
                for k, (prompt, output) in enumerate(turns[:num_requests - len(out)]):
                    out.append(Sample("", prompt, output, conversation=name, turn=k, shared_prefix=shared_prefix))
                if len(out) == num_requests:
                    return out
        if len(out) == before:
            raise ValueError("no conversation of the dataset passes the length rule")
        rounds += 1
    return out
