"""What admitting each waiting request as one kind costs, with its cached prefix counted: the tokens
it must still compute, the step time its prefix takes, the blocks it must still allocate."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aptray.cache.block_manager import BlockManager
from aptray.request import CacheKind


@dataclass(frozen=True)
class Admission:
    """Per waiting request (queue order), admitted as one kind this iteration."""
    chunk: np.ndarray   # tokens its first chunk computes
    cost: np.ndarray    # token budget it takes: the chunk, plus its cached prefix's re-projection
    blocks: np.ndarray  # blocks it takes from the pool (a cached block others hold is free)


def cached_starts(blocks: BlockManager, waiting, kind: CacheKind) -> tuple[np.ndarray, ...]:
    """Per waiting request: (tokens it starts from, blocks it shares, unheld cached blocks it takes out of
    the free count, cached tokens its first step re-projects to K, V). A hidden chunk re-projects its
    whole cached prefix; a KV request re-projects a cached hidden prefix once, by converting it."""
    n = len(waiting)
    tokens, shared, taken, reprojected = (np.zeros(n, np.int64) for _ in range(4))
    if blocks.caching:
        for i, req in enumerate(waiting):
            p = blocks.cached_prefix(req, kind)
            if p.tokens:
                tokens[i], shared[i], taken[i] = p.tokens, p.shared_as(kind), p.evictable
                reprojected[i] = p.tokens if p.source is CacheKind.HIDDEN else 0
    return tokens, shared, taken, reprojected


def admission(blocks: BlockManager, waiting, kind: CacheKind, computed: np.ndarray, total: np.ndarray,
              outputs: np.ndarray, token_budget: int, chunkable, reprojection_tokens) -> Admission:
    """chunkable(todo) -> bool array: whose remaining tokens may be split over iterations.
    reprojection_tokens(array) -> the step time of re-projecting that many tokens, in tokens."""
    start_tokens, shared, taken, reprojected = cached_starts(blocks, waiting, kind)
    start = np.maximum(computed, start_tokens)
    todo = total - start
    # the prefix's re-projection shares the budget, leaving at least half of it to new tokens (as
    # Scheduler._continue_prefills): a chunk priced over the whole budget could never be admitted
    reproj = reprojection_tokens(reprojected)
    chunk = np.where(chunkable(todo), np.minimum(todo, np.maximum(np.maximum(token_budget - reproj, token_budget // 2), 1)),
                     todo)
    upto = start + chunk
    # a request back from a preemption (it has outputs) is weighed by its whole context, so it
    # starts only when all of it fits: started on one chunk's room it is dropped again as the
    # running set grows, its re-computed tokens thrown away (docs/SCHEDULER.md, "Admission of violators")
    weighed = np.where(outputs > 0, np.maximum(upto, total), upto)
    return Admission(chunk, chunk + np.minimum(reproj, np.maximum(token_budget - chunk, 0)),
                     blocks.blocks_for(weighed, kind) - shared + taken)
