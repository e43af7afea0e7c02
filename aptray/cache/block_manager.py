"""Block accounting for the hybrid cache, in physical blocks (torch-free).

A physical block holds `block_size` tokens of KV or `hidden_block_size` tokens of hidden state
(block_size / r rounded down, r = hidden bytes / KV bytes per token per rank). A request's
tokens are all KV or all hidden. Policies ask questions (held, held_by, table, blocks_for) and
never read the tables themselves.
"""
from __future__ import annotations

from itertools import repeat

from aptray.request import CacheKind


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, hidden_block_size: int = 0):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hidden_block_size = hidden_block_size  # 0: hidden cache disabled
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}
        self._kinds: dict[str, CacheKind] = {}
        self._held_by = dict.fromkeys(CacheKind, 0)  # blocks held per kind, kept as tables change
        # table() as a tuple, kept until the table changes: a decode's table changes once per
        # block_size tokens, and a copy per running request per step was an allocation the GC counted
        self._table_tuples: dict[str, tuple[int, ...]] = {}

    @property
    def hidden_enabled(self) -> bool:
        return self.hidden_block_size > 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    # -- questions -----------------------------------------------------------------------------
    def tokens_per_block(self, kind: CacheKind) -> int:
        if kind is CacheKind.HIDDEN:
            if not self.hidden_enabled:
                raise ValueError("the hidden cache is disabled for this model")
            return self.hidden_block_size
        return self.block_size

    def blocks_for(self, num_tokens: int, kind: CacheKind) -> int:
        """Blocks that hold num_tokens tokens of that kind (element-wise for a numpy array)."""
        per = self.tokens_per_block(kind)
        return -(-num_tokens // per)

    def held(self, request_id: str) -> int:
        """Blocks the request holds (0 when it holds none)."""
        return len(self._tables.get(request_id, ()))

    def held_each(self, request_ids):
        """held() of each request id, lazily (C-level maps: no Python call per request)."""
        return map(len, map(self._tables.get, request_ids, repeat(())))

    def held_by(self, kind: CacheKind) -> int:
        """Blocks all requests of that kind hold."""
        return self._held_by[kind]

    def kind_of(self, request_id: str) -> CacheKind | None:
        """The kind of the request's blocks; None when it has no table."""
        return self._kinds.get(request_id)

    def table(self, request_id: str) -> tuple[int, ...]:
        table = self._table_tuples.get(request_id)
        if table is None:
            table = self._table_tuples[request_id] = tuple(self._tables[request_id])
        return table

    def owners(self) -> list[str]:
        """Request ids that have a table."""
        return list(self._tables)

    # -- changes -------------------------------------------------------------------------------
    def ensure(self, request_id: str, kind: CacheKind, num_tokens: int) -> list[int]:
        """Grow (or create) a request's table to hold num_tokens; raises OutOfBlocks, allocating nothing."""
        if request_id in self._kinds and self._kinds[request_id] is not kind:
            raise ValueError(f"request {request_id} is {self._kinds[request_id].value}, not {kind.value}")
        need = self.blocks_for(num_tokens, kind) - len(self._tables.get(request_id, ()))
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} blocks, {len(self._free)} free")
        table = self._tables.setdefault(request_id, [])
        self._kinds[request_id] = kind
        if need > 0:
            for _ in range(need):
                table.append(self._free.pop())
            self._held_by[kind] += need
            self._table_tuples.pop(request_id, None)
        return table

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, [])
        self._table_tuples.pop(request_id, None)
        kind = self._kinds.pop(request_id, None)
        if kind is not None:
            self._held_by[kind] -= len(table)
        self._free.extend(reversed(table))

    def convert(self, request_id: str, to_kind: CacheKind, num_tokens: int) -> tuple[list[int], list[int]]:
        """Re-home a request's num_tokens in to_kind blocks; returns (old blocks, new blocks).

        The old blocks are freed at once and may be reused, by this table too: the executor runs
        conversions first in a step and reads each request's old contents before writing.
        """
        old = self._tables[request_id]
        need = self.blocks_for(num_tokens, to_kind)
        if need > len(self._free) + len(old):
            raise OutOfBlocks(f"conversion needs {need} blocks, {len(self._free) + len(old)} free or own")
        self._free.extend(reversed(old))
        new = [self._free.pop() for _ in range(need)]
        self._held_by[self._kinds[request_id]] -= len(old)
        self._held_by[to_kind] += need
        self._tables[request_id] = new
        self._table_tuples.pop(request_id, None)
        self._kinds[request_id] = to_kind
        return old, new

    def check(self) -> None:
        """Invariants: every block is free or owned exactly once; the per-kind counts match the tables."""
        owned = [b for t in self._tables.values() for b in t]
        every = owned + self._free
        assert len(every) == len(set(every)) == self.num_blocks, "block leaked or double-owned"
        for kind in CacheKind:
            held = sum(len(t) for rid, t in self._tables.items() if self._kinds[rid] is kind)
            assert held == self._held_by[kind], f"{kind.value} blocks counted {self._held_by[kind]}, held {held}"
