"""StepContext: the per-step tensors every attention layer reads, built once from a BatchPlan."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aptray.plan import BatchPlan


@dataclass
class DecodeGroup:
    """Decode rows sharing one attention path, with padded block tables."""
    rows: torch.Tensor  # [N] rows of the flat token batch
    block_tables: torch.Tensor  # [N, max_blocks]
    context_lens: torch.Tensor  # [N]
    lens: tuple[int, ...] = ()  # the same on the host: kernels size their grids by them without a device sync
    all_rows: bool = False  # the group is every row of the batch, in order (a pure decode step)

    @property
    def max_len(self) -> int:
        return max(self.lens)


@dataclass
class PrefillSeq:
    rows: slice
    start_pos: int
    kind: str
    block_table: torch.Tensor  # [num_blocks]


@dataclass
class StepContext:
    positions: torch.Tensor
    kv_rows: torch.Tensor
    kv_slots: torch.Tensor
    hidden_rows: torch.Tensor
    hidden_slots: torch.Tensor
    prefills: list[PrefillSeq] = field(default_factory=list)
    decodes: dict[str, DecodeGroup] = field(default_factory=dict)  # "kv" | "absorbed" | "recompute"
    sample_rows: torch.Tensor | None = None
    all_kv: bool = False  # every row writes KV (no hidden rows): layers skip the row selection
    # per-step values derived once and shared by every layer (rotary cos/sin, decode gather indices)
    scratch: dict = field(default_factory=dict)


def _slots(table: tuple[int, ...], start: int, count: int, tokens_per_block: int) -> list[int]:
    return [table[p // tokens_per_block] * tokens_per_block + p % tokens_per_block
            for p in range(start, start + count)]


def _group(rows, tables, lens, device) -> DecodeGroup:
    width = max(len(t) for t in tables)
    padded = [list(t) + [0] * (width - len(t)) for t in tables]
    return DecodeGroup(torch.tensor(rows, device=device), torch.tensor(padded, device=device),
                       torch.tensor(lens, device=device), tuple(lens))


def build_step_context(plan: BatchPlan, block_size: int, hidden_block_size: int, hidden_attention: str,
                       device) -> tuple[torch.Tensor, StepContext]:
    """Flatten the plan's token chunks into one batch; returns (input_ids, context)."""
    ids, positions = [], []
    kv_rows, kv_slots, hid_rows, hid_slots, sample_rows = [], [], [], [], []
    prefills = []
    groups: dict[str, tuple[list, list, list]] = {}
    for seq in plan.seqs:
        row0, n = len(ids), len(seq.token_ids)
        ids.extend(seq.token_ids)
        positions.extend(range(seq.start_pos, seq.start_pos + n))
        hidden = seq.cache_kind == "hidden"
        per_block = hidden_block_size if hidden else block_size
        rows, slots = (hid_rows, hid_slots) if hidden else (kv_rows, kv_slots)
        rows.extend(range(row0, row0 + n))
        slots.extend(_slots(seq.block_table, seq.start_pos, n, per_block))
        if seq.is_decode:
            path = hidden_attention if hidden else "kv"
            g = groups.setdefault(path, ([], [], []))
            g[0].append(row0)
            g[1].append(seq.block_table)
            g[2].append(seq.context_len)
        else:
            prefills.append(PrefillSeq(slice(row0, row0 + n), seq.start_pos, seq.cache_kind,
                                       torch.tensor(seq.block_table, device=device)))
        if seq.sample:
            sample_rows.append(row0 + n - 1)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    decodes = {path: _group(*g, device) for path, g in groups.items()}
    for g in decodes.values():
        g.all_rows = len(g.rows) == len(ids)  # one token per decode row, rows in increasing order
    ctx = StepContext(t(positions), t(kv_rows), t(kv_slots), t(hid_rows), t(hid_slots), prefills,
                      decodes, t(sample_rows),
                      all_kv=len(kv_rows) == len(ids))
    return t(ids), ctx
