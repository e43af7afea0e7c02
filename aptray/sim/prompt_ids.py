"""Synthetic prompt token ids: a deterministic stream per key, the same in every run and client.

Requests of a trace that carries lengths only still need token content once the prefix cache looks
at it: the same ids for every request would all hit each other. A key (a request id, or a
conversation's) names a stream; a prompt of n tokens is the stream's first n, so the turns of one
conversation share their earlier tokens and nothing else does. A follow-up turn resends what was
said before it, the earlier prompt and the reply the server gave (follow_up_ids), as a chat client
does; the stream fills the rest (the new user message). Ids are small (every vocabulary has
them) and never the first four (special tokens in OPT's and most vocabularies).
"""
from __future__ import annotations

from hashlib import blake2b

import numpy as np

LOW, HIGH = 4, 100  # ids in [LOW, HIGH)


def stream_ids(key: str, n: int, start: int = 0) -> list[int]:
    """Tokens [start, start + n) of key's stream: a counter hashed by splitmix64, so any prefix of a
    longer stream is the shorter one."""
    seed = np.uint64(int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little"))
    with np.errstate(over="ignore"):
        z = seed + np.arange(start + 1, start + n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (LOW + z % np.uint64(HIGH - LOW)).astype(np.int64).tolist()


SHARED_PREFIX_KEY = "aptray-shared-system-prompt"


def prompt_ids(key: str, n: int, shared_prefix: int = 0) -> list[int]:
    """n ids: the first shared_prefix of the stream every request shares (a system prompt), then key's own."""
    head = stream_ids(SHARED_PREFIX_KEY, min(shared_prefix, n))
    return head + stream_ids(key, n - len(head))


def follow_up_ids(stream: list[int], said: list[int] | None) -> list[int]:
    """A conversation's next turn as a chat client sends it: what was said before (the last turn's
    prompt and the reply it got), then the turn's own stream from there on (the next user message).
    said None, or not shorter than the turn: the stream alone."""
    if said is None or len(said) >= len(stream):
        return stream
    return said + stream[len(said):]
