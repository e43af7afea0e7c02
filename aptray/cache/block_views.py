"""One physical block pool shared by several schedulers: a BlockManager view per in-flight micro-batch.

With pipeline parallelism several batches are in flight at once, one per scheduler (vLLM's virtual
engines). vLLM 0.5 gives each a fixed 1/pp of the blocks; here they share one pool, and each
scheduler sees a BlockManager of its own requests whose size is what it could hold now: its own
blocks plus every free one. A policy's arithmetic on num_blocks, num_free and tables (apt's "does
the running set fit", the blocks its decodes read) then stays about its own requests, and blocks
one micro-batch frees are at once free for all. Torch-free, like the block manager.
"""
from __future__ import annotations

from contextlib import contextmanager

from aptray.cache.block_manager import BlockManager
from aptray.request import CacheKind


class SharedBlockPool:
    """The physical blocks (ids 0..num_blocks-1) and the free list every view hands out from."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("need at least one block")
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.views: list[BlockView] = []

    def view(self, block_size: int, hidden_block_size: int = 0) -> "BlockView":
        v = BlockView(self, block_size, hidden_block_size)
        self.views.append(v)
        return v

    def check(self) -> None:
        """Every block is free or owned by exactly one request of one view."""
        owned = [b for v in self.views for rid in v.owners() for b in v.table(rid)]
        every = owned + self.free
        assert len(every) == len(set(every)) == self.num_blocks, "block leaked or double-owned"


class BlockView(BlockManager):
    """A BlockManager over a SharedBlockPool: its own tables, the pool's free list.
    num_blocks = its blocks + the free ones (what its requests could hold now), except inside
    whole_pool(), where it is the pool's size (admission's "could this request ever fit")."""

    def __init__(self, pool: SharedBlockPool, block_size: int, hidden_block_size: int = 0):
        if block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.pool = pool
        self.block_size = block_size
        self.hidden_block_size = hidden_block_size
        self._free = pool.free  # the same list object: allocations anywhere are seen everywhere
        self._tables: dict[str, list[int]] = {}
        self._table_tuples: dict[str, tuple[int, ...]] = {}
        self._kinds: dict[str, CacheKind] = {}
        self._held_by = dict.fromkeys(CacheKind, 0)
        self._init_prefix_cache(pool.num_blocks, False)  # stages share no cached prefixes
        self._whole = False

    @property
    def held_total(self) -> int:
        """Blocks this view's requests hold."""
        return sum(self._held_by.values())

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks if self._whole else self.held_total + len(self._free)

    @contextmanager
    def whole_pool(self):
        self._whole = True
        try:
            yield self
        finally:
            self._whole = False

    def check(self) -> None:
        for kind in CacheKind:
            held = sum(len(t) for rid, t in self._tables.items() if self._kinds[rid] is kind)
            assert held == self._held_by[kind], "view's block count drifted"
        self.pool.check()
