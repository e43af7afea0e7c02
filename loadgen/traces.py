"""Trace files: the exact requests of a run (arrival, lengths, SLOs), so runs reproduce.

JSONL holds every field (and the prompt text when kept). CSV uses vidur's columns
arrived_at,num_prefill_tokens,num_decode_tokens (plus optional request_id,ttft_slo,tbt_slo, and
conversation,shared_prefix,after,think_time for multi-turn traces); CSVs with only the three vidur
columns are read too.

A multi-turn trace is closed loop per conversation: a conversation's first turn arrives at its
arrived_at (Gamma arrivals of conversations, at the request rate over the mean turns per
conversation, so that the rate still counts requests); each later turn names the turn it follows
(`after`) and comes think_time after that one ends, its arrived_at only a placeholder (the previous
arrival plus the think time) until a client replays it.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from loadgen.arrivals import arrival_times
from loadgen.samples import Sample


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrived_at: float  # seconds from the start of the run
    num_prefill_tokens: int
    num_decode_tokens: int
    ttft_slo: float | None = None  # seconds; None: the run's default
    tbt_slo: float | None = None
    prompt: str | None = None
    # multi-turn: the conversation (its token stream: aptray.sim.prompt_ids), the shared system prompt's
    # tokens at the start, the request this one follows and the seconds after that one's end
    conversation: str | None = None
    shared_prefix: int = 0
    after: str | None = None
    think_time: float | None = None


CSV_COLUMNS = ("request_id", "arrived_at", "num_prefill_tokens", "num_decode_tokens", "ttft_slo", "tbt_slo")
CHAT_COLUMNS = ("conversation", "shared_prefix", "after", "think_time")
DEFAULTS = {f.name: f.default for f in fields(TraceRequest)}  # left out of JSONL lines


def make_trace(samples: list[Sample], rate: float, cv: float = 1.0, seed: int = 0,
               ttft_slo: float | None = None, tbt_slo: float | None = None, keep_prompts: bool = False,
               think_time: float | None = None) -> list[TraceRequest]:
    """Requests at Gamma arrivals; samples of conversations (Sample.conversation) as a closed loop,
    think times exponential of mean think_time (default loadgen.conversations.DEFAULT_THINK_S)."""
    if any(s.conversation is not None for s in samples):
        from loadgen.conversations import DEFAULT_THINK_S
        think = np.random.default_rng(seed + 1).exponential(think_time or DEFAULT_THINK_S, len(samples))
        trace, last = [], {}
        for i, (s, t) in enumerate(zip(samples, think)):
            after = last.get(s.conversation)
            trace.append(TraceRequest(f"req-{i}", 0.0, s.prompt_len, s.output_len, ttft_slo, tbt_slo,
                                      s.prompt if keep_prompts else None, s.conversation, s.shared_prefix,
                                      after, None if after is None else float(t)))
            last[s.conversation] = trace[-1].request_id
        return rescale(trace, rate, cv, seed)
    times = arrival_times(rate, cv, len(samples), seed)
    return [TraceRequest(f"req-{i}", float(t), s.prompt_len, s.output_len, ttft_slo, tbt_slo,
                         s.prompt if keep_prompts else None)
            for i, (s, t) in enumerate(zip(samples, times))]


def rescale(trace: list[TraceRequest], rate: float, cv: float = 1.0, seed: int = 0) -> list[TraceRequest]:
    """The same requests at another arrival rate (fresh Gamma arrivals with the given seed): of
    conversations, at rate / (requests per conversation), in a multi-turn trace."""
    starts = [r for r in trace if r.after is None]
    times = arrival_times(rate * len(starts) / len(trace) if trace else rate, cv, len(starts), seed)
    arrived = {r.request_id: float(t) for r, t in zip(starts, times)}
    for r in trace:  # a follow-up's placeholder: the turn it follows plus its think time
        if r.after is not None:
            arrived[r.request_id] = arrived[r.after] + (r.think_time or 0.0)
    return [replace(r, arrived_at=arrived[r.request_id]) for r in trace]


def write_trace(path: str, trace: list[TraceRequest]) -> None:
    if path.endswith(".csv"):
        chat = any(r.conversation is not None for r in trace)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS + (CHAT_COLUMNS if chat else ()))
            for r in trace:
                row = [r.request_id, repr(r.arrived_at), r.num_prefill_tokens, r.num_decode_tokens,
                       "" if r.ttft_slo is None else repr(r.ttft_slo), "" if r.tbt_slo is None else repr(r.tbt_slo)]
                if chat:
                    row += [r.conversation or "", r.shared_prefix, r.after or "",
                            "" if r.think_time is None else repr(r.think_time)]
                w.writerow(row)
        return
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps({k: v for k, v in asdict(r).items() if v is not None and v != DEFAULTS.get(k)}) + "\n")


def read_trace(path: str) -> list[TraceRequest]:
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        out = []
        for i, row in enumerate(rows):
            def opt(name):
                v = row.get(name)
                return float(v) if v not in (None, "") else None
            out.append(TraceRequest(row.get("request_id") or f"req-{i}", float(row["arrived_at"]),
                                    int(float(row["num_prefill_tokens"])), int(float(row["num_decode_tokens"])),
                                    opt("ttft_slo"), opt("tbt_slo"), None, row.get("conversation") or None,
                                    int(row.get("shared_prefix") or 0), row.get("after") or None, opt("think_time")))
        return sorted(out, key=lambda r: r.arrived_at)
    names = {f.name for f in fields(TraceRequest)}
    with open(path) as f:
        out = [TraceRequest(**{k: v for k, v in json.loads(line).items() if k in names}) for line in f if line.strip()]
    return sorted(out, key=lambda r: r.arrived_at)
