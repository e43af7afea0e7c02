"""Block accounting for the hybrid cache, in physical blocks (torch-free), with prefix caching.

A physical block holds `block_size` tokens of KV or `hidden_block_size` tokens of hidden state
(block_size / r rounded down, r = hidden bytes / KV bytes per token per rank). A request's
tokens are all KV or all hidden. Policies ask questions (held, held_by, table, blocks_for,
cached_prefix, is_cached) and never read the tables themselves.

Prefix caching (enable_caching): a full block whose tokens are computed is published under the key
of its hash chain (aptray.cache.block_hash: its tokens, all tokens before it, its kind). A request
admitted later whose chain starts the same way shares those blocks (a reference count per block)
instead of computing them, and prefills only the rest. A block nobody holds keeps its key and goes
to an LRU set of evictable blocks instead of the free list; allocation takes free blocks first,
then evicts the least recently released. Only full blocks are shared and a shared block is never
written (its holders write past it), so sharing needs no copy. The block holding a request's last
token is never taken from the cache: at least one token is computed, so there is one to sample.
A KV request may start from a cached hidden prefix by converting it (one projection into its own
new KV blocks, a ConversionPlan the scheduler plans); a hidden request cannot use a KV prefix (KV
does not keep the layer inputs).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from itertools import repeat

from aptray.cache.block_hash import block_keys
from aptray.request import CacheKind, Request


class OutOfBlocks(RuntimeError):
    pass


@dataclass(frozen=True)
class CachedPrefix:
    """What a waiting request can take from the cache: its first `tokens` tokens, in `blocks` of kind
    `source` (hidden for a KV request converting a hidden prefix; else the request's own kind)."""
    tokens: int = 0
    blocks: tuple[int, ...] = ()
    source: CacheKind | None = None
    evictable: int = 0  # of blocks, those nobody holds: taking them shrinks num_free

    def shared_as(self, kind: CacheKind) -> int:
        """Blocks a request of that kind shares instead of allocating (0 when it converts them)."""
        return len(self.blocks) if self.source is kind else 0


NO_PREFIX = CachedPrefix()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, hidden_block_size: int = 0, enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.hidden_block_size = hidden_block_size  # 0: hidden cache disabled
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[str, list[int]] = {}
        self._kinds: dict[str, CacheKind] = {}
        self._held_by = dict.fromkeys(CacheKind, 0)  # table entries per kind (a shared block once per table)
        self._init_prefix_cache(num_blocks, enable_caching)
        # table() as a tuple, kept until the table changes: a decode's table changes once per
        # block_size tokens, and a copy per running request per step would be an allocation the GC counts
        self._table_tuples: dict[str, tuple[int, ...]] = {}

    def _init_prefix_cache(self, num_blocks: int, enable_caching: bool) -> None:
        """The prefix cache's state over num_blocks block ids (empty, and never filled, when off)."""
        self.caching = enable_caching
        self._refs = [0] * num_blocks  # holders per block: tables, and conversions reading it this step
        self._num_shared = 0  # blocks with more than one holder
        self._key_of: dict[int, bytes] = {}  # published block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> published block
        # published blocks nobody holds, per kind of their key, least recently released first (the value
        # orders releases across kinds)
        self._evictable: dict[CacheKind, OrderedDict[int, int]] = {kind: OrderedDict() for kind in CacheKind}
        self._released = 0
        self._cached_kind: dict[int, CacheKind] = {}  # published block -> the kind its key is of
        # a kind whose cached blocks go first when allocation must evict (None: least recently released
        # of any kind). The apt scheduler sets KV in hybrid mode: a hidden block keeps twice the tokens
        self.evict_first: CacheKind | None = None
        self._published: dict[str, int] = {}  # request -> blocks at the front of its table whose keys are published
        self._lent: dict[str, list[int]] = {}  # request -> cached hidden blocks its conversion reads this step
        self._next_full: dict[str, int] = {}  # request -> computed tokens that fill its next unpublished block
        self.evictions = 0

    @property
    def hidden_enabled(self) -> bool:
        return self.hidden_block_size > 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones nobody holds."""
        return len(self._free) + self.num_evictable

    @property
    def num_evictable(self) -> int:
        """Cached blocks nobody holds (kept for later hits until allocation needs them)."""
        return sum(map(len, self._evictable.values()))

    @property
    def num_shared(self) -> int:
        """Blocks held by more than one request (each counts once)."""
        return self._num_shared

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

    def shared_each(self, request_ids) -> list[int]:
        """Per request id, the blocks of its table that others hold too (they stay if it lets go)."""
        if not self._num_shared:
            return [0] * len(request_ids)
        refs, out = self._refs, []
        for rid in request_ids:
            table = self._tables.get(rid, ())
            out.append(sum(refs[b] > 1 for b in table[:self._published.get(rid, 0)]))
        return out

    def held_alone(self, request_id: str) -> int:
        """Blocks that would return to the pool if the request let go of its table."""
        return self.held(request_id) - self.shared_each([request_id])[0]

    def held_by(self, kind: CacheKind) -> int:
        """Blocks all requests of that kind hold (a shared block once per request: what their attention reads)."""
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

    def is_cached(self, key: bytes) -> bool:
        """Whether a block of that key (aptray.cache.block_hash) is published and not evicted. One dict
        lookup: safe from another thread while this one changes the cache."""
        return key in self._block_of

    def cached_prefix(self, req: Request, kind: CacheKind, convert: bool = True) -> CachedPrefix:
        """The longest prefix of req's tokens a new table of that kind can start from: published blocks
        of that kind, or (a KV request, convert) hidden ones if they hold more tokens. Never the block of
        its last token."""
        # a request asking for its prompt's log-probabilities computes the whole prompt
        if not self.caching or not self._block_of or req.sampling.prompt_logprobs is not None:
            return NO_PREFIX
        last = req.num_tokens - 1  # tokens before the last one: what may come from the cache
        best = NO_PREFIX
        for source in (kind, CacheKind.HIDDEN) if kind is CacheKind.KV and convert else (kind,):
            if source is CacheKind.HIDDEN and not self.hidden_enabled:
                continue
            per = self.tokens_per_block(source)
            blocks = self._match(req, source, per, last // per)
            if len(blocks) * per > best.tokens:
                best = CachedPrefix(len(blocks) * per, tuple(blocks), source,
                                    sum(self._refs[b] == 0 for b in blocks))
        return best

    def _match(self, req: Request, kind: CacheKind, per: int, most: int) -> list[int]:
        """Published blocks for req's first blocks of that kind, up to `most`, stopping at the first miss."""
        out, block_of = [], self._block_of
        for j in range(most):
            keys = req.block_keys.get(kind, ())
            key = keys[j] if j < len(keys) else block_keys(req, kind, per, j + 1)[j]
            b = block_of.get(key)
            if b is None:
                break
            out.append(b)
        return out

    # -- changes -------------------------------------------------------------------------------
    def _take(self) -> int:
        """One block for a new holder: a free one, else the least recently released cached one."""
        if self._free:
            b = self._free.pop()
        else:
            b = self._oldest_evictable()
            del self._evictable[self._cached_kind.pop(b)][b]
            del self._block_of[self._key_of.pop(b)]
            self.evictions += 1
        self._refs[b] = 1
        return b

    def _oldest_evictable(self) -> int:
        """The block to evict: the least recently released of evict_first's kind if any, else of any kind."""
        first = self._evictable[self.evict_first] if self.evict_first is not None else None
        if first:
            return next(iter(first))
        heads = [(q[b], b) for q in self._evictable.values() if q for b in (next(iter(q)),)]
        return min(heads)[1]

    def _hold(self, b: int) -> None:
        """One more holder of a published block."""
        r = self._refs[b]
        if r == 0:
            del self._evictable[self._cached_kind[b]][b]
        elif r == 1:
            self._num_shared += 1
        self._refs[b] = r + 1

    def _release(self, b: int) -> None:
        r = self._refs[b] = self._refs[b] - 1
        if r == 1:
            self._num_shared -= 1
        elif r == 0:
            if b in self._key_of:
                self._evictable[self._cached_kind[b]][b] = self._released  # most recently released: evicted last
                self._released += 1
            else:
                self._free.append(b)

    def ensure(self, request_id: str, kind: CacheKind, num_tokens: int) -> list[int]:
        """Grow (or create) a request's table to hold num_tokens; raises OutOfBlocks, allocating nothing."""
        held = self._kinds.get(request_id)
        if held is not None and held is not kind:
            raise ValueError(f"request {request_id} is {held.value}, not {kind.value}")
        need = self.blocks_for(num_tokens, kind) - len(self._tables.get(request_id, ()))
        if need <= 0 and held is not None:  # the common decode step: its last block has room
            return self._tables[request_id]
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} blocks, {self.num_free} free")
        table = self._tables.setdefault(request_id, [])
        self._kinds[request_id] = kind
        if need > 0:
            for _ in range(need):
                table.append(self._take())
            self._held_by[kind] += need
            self._table_tuples.pop(request_id, None)
        return table

    def allocate(self, req: Request, kind: CacheKind, prefix: CachedPrefix, num_tokens: int) -> bool:
        """A new table of that kind for num_tokens, starting from prefix (from cached_prefix, with no
        change in between): shared blocks when it is of that kind, else fresh blocks the caller's
        conversion fills from it (its blocks are held until publish()). False: nothing taken."""
        rid = req.request_id
        if rid in self._tables:
            raise ValueError(f"request {rid} already holds blocks")
        shared = prefix.blocks if prefix.source is kind else ()
        need = self.blocks_for(num_tokens, kind) - len(shared)
        if need > self.num_free - prefix.evictable:  # the prefix's unheld blocks stop being free
            return False
        for b in prefix.blocks:
            self._hold(b)
        table = list(shared)
        table += [self._take() for _ in range(need)]
        self._tables[rid] = table
        self._kinds[rid] = kind
        self._held_by[kind] += len(table)
        self._published[rid] = len(shared)
        self._next_full.pop(rid, None)
        if prefix.blocks and not shared:
            self._lent[rid] = list(prefix.blocks)
        return True

    def publish(self, req: Request) -> None:
        """After a step that computed req's tokens: publish its full blocks' keys; let go of the blocks
        a conversion read. (Called for every planned request every step: the common case, no block
        filled, is one lookup.)"""
        if not self.caching:
            return
        rid = req.request_id
        if self._lent and rid in self._lent:
            for b in self._lent.pop(rid):
                self._release(b)
        if req.num_computed_tokens < self._next_full.get(rid, 0):
            return
        table = self._tables.get(rid)
        if table is None:
            return
        per = self.tokens_per_block(self._kinds[rid])
        full = min(req.num_computed_tokens // per, len(table))
        done = self._published.get(rid, 0)
        if full > done:
            keys = block_keys(req, self._kinds[rid], per, full)
            kind = self._kinds[rid]
            for j in range(done, full):
                if keys[j] not in self._block_of:  # else another block has it: this one stays private
                    self._block_of[keys[j]] = table[j]
                    self._key_of[table[j]] = keys[j]
                    self._cached_kind[table[j]] = kind
            self._published[rid] = done = full
        self._next_full[rid] = (done + 1) * per

    def free(self, request_id: str) -> None:
        """The request lets go of its blocks; published ones stay cached (the table's tail is evicted first)."""
        table = self._tables.pop(request_id, [])
        self._table_tuples.pop(request_id, None)
        kind = self._kinds.pop(request_id, None)
        if kind is not None:
            self._held_by[kind] -= len(table)
        for b in reversed(table):
            self._release(b)
        for b in self._lent.pop(request_id, ()):
            self._release(b)
        self._published.pop(request_id, None)
        self._next_full.pop(request_id, None)

    def convert(self, request_id: str, to_kind: CacheKind, num_tokens: int) -> tuple[list[int], list[int]]:
        """Re-home a request's num_tokens in to_kind blocks; returns (old blocks, new blocks).

        The old blocks are let go at once and may be reused, by this table too: the executor runs
        conversions first in a step and reads each request's old contents before writing. Old blocks
        others hold stay theirs (the new blocks are this request's own); published ones stay cached.
        """
        old = self._tables[request_id]
        need = self.blocks_for(num_tokens, to_kind)
        own = len(old) - self.shared_each([request_id])[0]
        if need > self.num_free + own:
            raise OutOfBlocks(f"conversion needs {need} blocks, {self.num_free + own} free or own")
        for b in reversed(old):
            self._release(b)
        new = [self._take() for _ in range(need)]
        self._held_by[self._kinds[request_id]] -= len(old)
        self._held_by[to_kind] += need
        self._tables[request_id] = new
        self._table_tuples.pop(request_id, None)
        self._kinds[request_id] = to_kind
        self._published[request_id] = 0
        self._next_full.pop(request_id, None)
        return old, new

    def check(self) -> None:
        """Invariants: each block is free, evictable (published, unheld) or held, and counted as many
        times as tables and conversions hold it; published keys map both ways; the per-kind counts
        match the tables."""
        holders = Counter(b for t in self._tables.values() for b in t)
        holders.update(b for blocks in self._lent.values() for b in blocks)
        for b in range(self.num_blocks):
            assert self._refs[b] == holders[b], f"block {b}: {self._refs[b]} references, {holders[b]} holders"
        free, evictable = set(self._free), {b for q in self._evictable.values() for b in q}
        assert all(self._cached_kind[b] is kind for kind, q in self._evictable.items() for b in q), "queue of a kind"
        assert set(self._cached_kind) == set(self._key_of), "a published block without its kind"
        assert len(free) == len(self._free), "a block is free twice"
        held = {b for b in range(self.num_blocks) if self._refs[b]}
        assert not (free & evictable) and not (free & held) and not (evictable & held), "block free while held"
        assert len(free) + len(evictable) + len(held) == self.num_blocks, "block leaked"
        assert all(b in self._key_of for b in evictable), "an evictable block has no key"
        assert not any(b in self._key_of for b in free), "a free block kept its key"
        assert all(self._refs[b] < 2 or b in self._key_of for b in held), "an unpublished block is shared"
        assert all(self._block_of[k] == b for b, k in self._key_of.items()), "keys do not map both ways"
        assert len(self._block_of) == len(self._key_of), "keys do not map both ways"
        assert self._num_shared == sum(r > 1 for r in self._refs), "shared count drifted"
        for kind in CacheKind:
            held_k = sum(len(t) for rid, t in self._tables.items() if self._kinds[rid] is kind)
            assert held_k == self._held_by[kind], f"{kind.value} blocks counted {self._held_by[kind]}, held {held_k}"
