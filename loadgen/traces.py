"""Trace files: the exact requests of a run (arrival, lengths, SLOs), so runs reproduce.

JSONL holds every field (and the prompt text when kept). CSV uses vidur's columns
arrived_at,num_prefill_tokens,num_decode_tokens (plus optional request_id,ttft_slo,tbt_slo);
CSVs with only the three vidur columns are read too.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields, replace

from loadgen.arrivals import arrival_times
from loadgen.datasets import Sample


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrived_at: float  # seconds from the start of the run
    num_prefill_tokens: int
    num_decode_tokens: int
    ttft_slo: float | None = None  # seconds; None: the run's default
    tbt_slo: float | None = None
    prompt: str | None = None


CSV_COLUMNS = ("request_id", "arrived_at", "num_prefill_tokens", "num_decode_tokens", "ttft_slo", "tbt_slo")


def make_trace(samples: list[Sample], rate: float, cv: float = 1.0, seed: int = 0,
               ttft_slo: float | None = None, tbt_slo: float | None = None, keep_prompts: bool = False
               ) -> list[TraceRequest]:
    times = arrival_times(rate, cv, len(samples), seed)
    return [TraceRequest(f"req-{i}", float(t), s.prompt_len, s.output_len, ttft_slo, tbt_slo,
                         s.prompt if keep_prompts else None)
            for i, (s, t) in enumerate(zip(samples, times))]


def rescale(trace: list[TraceRequest], rate: float, cv: float = 1.0, seed: int = 0) -> list[TraceRequest]:
    """The same requests at another arrival rate (fresh Gamma arrivals with the given seed)."""
    times = arrival_times(rate, cv, len(trace), seed)
    return [replace(r, arrived_at=float(t)) for r, t in zip(trace, times)]


def write_trace(path: str, trace: list[TraceRequest]) -> None:
    if path.endswith(".csv"):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in trace:
                w.writerow([r.request_id, repr(r.arrived_at), r.num_prefill_tokens, r.num_decode_tokens,
                            "" if r.ttft_slo is None else repr(r.ttft_slo), "" if r.tbt_slo is None else repr(r.tbt_slo)])
        return
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps({k: v for k, v in asdict(r).items() if v is not None}) + "\n")


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
                                    opt("ttft_slo"), opt("tbt_slo")))
        return sorted(out, key=lambda r: r.arrived_at)
    names = {f.name for f in fields(TraceRequest)}
    with open(path) as f:
        out = [TraceRequest(**{k: v for k, v in json.loads(line).items() if k in names}) for line in f if line.strip()]
    return sorted(out, key=lambda r: r.arrived_at)
