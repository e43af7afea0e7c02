"""Block accounting for the hybrid cache, in physical blocks (torch-free).

A physical block holds `block_size` tokens of KV or `hidden_block_size` tokens of hidden state
(block_size / r rounded down, r = hidden bytes / KV bytes per token per rank). A request's
tokens are all KV or all hidden.
"""
from __future__ import annotations

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
        self.tables: dict[str, list[int]] = {}
        self.kinds: dict[str, CacheKind] = {}

    @property
    def hidden_enabled(self) -> bool:
        return self.hidden_block_size > 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def tokens_per_block(self, kind: CacheKind) -> int:
        if kind is CacheKind.HIDDEN:
            if not self.hidden_enabled:
                raise ValueError("the hidden cache is disabled for this model")
            return self.hidden_block_size
        return self.block_size

    def blocks_for(self, num_tokens: int, kind: CacheKind) -> int:
        per = self.tokens_per_block(kind)
        return -(-num_tokens // per)

    def extra_blocks_for(self, request_id: str, num_tokens: int, kind: CacheKind | None = None) -> int:
        """Blocks a request must add to hold num_tokens (0 if it already can)."""
        kind = kind or self.kinds[request_id]
        held = len(self.tables.get(request_id, ()))
        return max(0, self.blocks_for(num_tokens, kind) - held)

    def ensure(self, request_id: str, kind: CacheKind, num_tokens: int) -> list[int]:
        """Grow (or create) a request's table to hold num_tokens; raises OutOfBlocks, allocating nothing."""
        if request_id in self.kinds and self.kinds[request_id] is not kind:
            raise ValueError(f"request {request_id} is {self.kinds[request_id].value}, not {kind.value}")
        need = self.blocks_for(num_tokens, kind) - len(self.tables.get(request_id, ()))
        if need > len(self._free):
            raise OutOfBlocks(f"need {need} blocks, {len(self._free)} free")
        table = self.tables.setdefault(request_id, [])
        self.kinds[request_id] = kind
        for _ in range(max(0, need)):
            table.append(self._free.pop())
        return table

    def free(self, request_id: str) -> None:
        self._free.extend(reversed(self.tables.pop(request_id, [])))
        self.kinds.pop(request_id, None)

    def convert(self, request_id: str, to_kind: CacheKind, num_tokens: int) -> tuple[list[int], list[int]]:
        """Re-home a request's num_tokens in to_kind blocks; returns (old blocks, new blocks).

        The old blocks are freed at once and may be reused, by this table too: the executor runs
        conversions first in a step and reads each request's old contents before writing.
        """
        old = self.tables[request_id]
        need = self.blocks_for(num_tokens, to_kind)
        if need > len(self._free) + len(old):
            raise OutOfBlocks(f"conversion needs {need} blocks, {len(self._free) + len(old)} free or own")
        self._free.extend(reversed(old))
        new = [self._free.pop() for _ in range(need)]
        self.tables[request_id] = new
        self.kinds[request_id] = to_kind
        return old, new

    def check(self) -> None:
        """Invariants: every block is free or owned exactly once."""
        owned = [b for t in self.tables.values() for b in t]
        every = owned + self._free
        assert len(every) == len(set(every)) == self.num_blocks, "block leaked or double-owned"
