"""Block accounting: random admit/append/convert/free sequences never overdraw, leak or double-own."""
from __future__ import annotations

import math
import random

import pytest

from aptray.cache.block_manager import BlockManager, OutOfBlocks
from aptray.request import CacheKind


@pytest.mark.parametrize("seed,block_size,hidden_block_size", [(0, 16, 32), (1, 4, 8), (2, 1, 2), (3, 16, 21)])
def test_random_operations_keep_the_pool_consistent(seed, block_size, hidden_block_size):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=64, block_size=block_size, hidden_block_size=hidden_block_size)
    tokens: dict[str, int] = {}
    r = block_size / hidden_block_size
    for step in range(1000):
        op = rng.choice(["admit", "append", "append", "convert", "free"])
        live = list(tokens)
        try:
            if op == "admit" or not live:
                rid, kind = f"q{step}", rng.choice([CacheKind.KV, CacheKind.HIDDEN])
                n = rng.randint(1, 8 * block_size)
                bm.ensure(rid, kind, n)
                tokens[rid] = n
            elif op == "append":
                rid = rng.choice(live)
                n = tokens[rid] + rng.randint(1, block_size)
                bm.ensure(rid, bm.kind_of(rid), n)
                tokens[rid] = n
            elif op == "convert":
                rid = rng.choice(live)
                to = CacheKind.KV if bm.kind_of(rid) is CacheKind.HIDDEN else CacheKind.HIDDEN
                bm.convert(rid, to, tokens[rid])
            else:
                rid = rng.choice(live)
                bm.free(rid)
                del tokens[rid]
        except OutOfBlocks:
            pass  # refused whole: nothing may have been taken
        bm.check()
        held = sum(bm.held(rid) for rid in bm.owners())
        assert held + bm.num_free == bm.num_blocks
        for rid, n in tokens.items():
            m = math.ceil(n / block_size)  # KV blocks it would need
            want = m if bm.kind_of(rid) is CacheKind.KV else math.ceil(n / hidden_block_size)
            assert bm.held(rid) == want
            if bm.kind_of(rid) is CacheKind.HIDDEN and hidden_block_size == 2 * block_size:
                assert want == math.ceil(r * m)  # r = 0.5: a hidden request holds ceil(r*m) blocks
    for rid in list(tokens):
        bm.free(rid)
    assert bm.num_free == bm.num_blocks


def test_refused_allocation_takes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4, hidden_block_size=8)
    bm.ensure("a", CacheKind.KV, 12)
    with pytest.raises(OutOfBlocks):
        bm.ensure("b", CacheKind.KV, 8)
    assert bm.num_free == 1 and "b" not in bm.owners()


def test_hidden_disabled_refuses_hidden():
    bm = BlockManager(num_blocks=4, block_size=4, hidden_block_size=0)
    with pytest.raises(ValueError, match="hidden cache is disabled"):
        bm.ensure("a", CacheKind.HIDDEN, 3)
