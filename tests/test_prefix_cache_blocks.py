"""Prefix caching in the block manager: a model of what every block holds, driven by random admissions
(prompts sharing prefixes), steps, growth, conversions and frees. Hits must hold the request's own
tokens at the same positions, no block may be written while shared or published, none freed while
held; eviction takes the least recently released."""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aptray.cache.block_hash import block_keys
from aptray.cache.block_manager import NO_PREFIX, BlockManager, OutOfBlocks
from aptray.request import CacheKind, Request
from aptray.sampling_params import SamplingParams

KV, HIDDEN = CacheKind.KV, CacheKind.HIDDEN
# three prompts sharing their first 8 and (two of them) 12 tokens
STEMS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
         [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 31, 32, 33, 34, 35, 36],
         [1, 2, 3, 4, 5, 6, 7, 8, 41, 42, 43, 44, 45, 46, 47, 48, 49]]


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), 0.0, 1.0, 1.0)


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(6, 24), block_size=st.sampled_from([2, 3]))
    def start(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size, 2 * block_size, enable_caching=True)
        self.reqs: dict[str, Request] = {}
        self.allocated: dict[str, int] = {}  # tokens its table was grown for
        self.content: dict[int, dict[int, tuple[str, int]]] = {}  # block -> offset -> (kind, token at that position)
        self.position: dict[int, int] = {}  # block -> index of the block in the table that wrote it
        self.next_id = 0

    def per(self, kind):
        return self.bm.tokens_per_block(kind)

    def tokens_of(self, req):
        return req.prompt_token_ids + req.output_token_ids

    def write(self, rid, start, end):
        """The step's writes of tokens [start, end) into rid's blocks: never into a shared or published block."""
        req, kind = self.reqs[rid], self.bm.kind_of(rid)
        per, table, tokens = self.per(kind), self.bm.table(rid), self.tokens_of(req)
        for p in range(start, end):
            b = table[p // per]
            assert self.bm._refs[b] == 1 and b not in self.bm._key_of, f"write into shared/published block {b}"
            if p % per == 0:
                self.content[b] = {}
            self.content[b][p % per] = (kind.value, tokens[p])
            self.position[b] = p // per

    def check_prefix(self, req, prefix):
        per, tokens = self.per(prefix.source), self.tokens_of(req)
        assert prefix.tokens == len(prefix.blocks) * per < req.num_tokens  # never the last token's block
        for j, b in enumerate(prefix.blocks):
            assert self.position[b] == j, "a cached block served at another position"
            assert [self.content[b][o] for o in range(per)] == [(prefix.source.value, t)
                                                                  for t in tokens[j * per:(j + 1) * per]]

    @rule(stem=st.integers(0, 2), cut=st.integers(1, 20), tail=st.lists(st.integers(50, 60), max_size=4),
          kind=st.sampled_from([KV, HIDDEN]), chunk=st.integers(1, 20))
    def admit(self, stem, cut, tail, kind, chunk):
        rid = f"r{self.next_id}"
        self.next_id += 1
        req = request(rid, STEMS[stem][:cut] + tail)
        prefix = self.bm.cached_prefix(req, kind)
        if prefix is not NO_PREFIX:
            self.check_prefix(req, prefix)
        n = prefix.tokens + min(chunk, req.num_tokens - prefix.tokens)
        free_before = self.bm.num_free
        if not self.bm.allocate(req, kind, prefix, n):
            assert self.bm.num_free == free_before and rid not in self.bm.owners()
            return
        self.reqs[rid], self.allocated[rid] = req, n
        req.cache_kind, req.num_computed_tokens = kind, prefix.tokens
        if prefix.tokens and prefix.source is not kind:  # the conversion a scheduler plans: hidden -> KV
            self.write(rid, 0, prefix.tokens)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def step(self, data):
        """Compute what the table was grown for, then publish (as Scheduler.update does)."""
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        req = self.reqs[rid]
        self.write(rid, req.num_computed_tokens, self.allocated[rid])
        req.num_computed_tokens = self.allocated[rid]
        self.bm.publish(req)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data(), extra=st.integers(1, 6))
    def grow(self, data, extra):
        """Generated tokens (or the rest of the prompt) get blocks."""
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        req = self.reqs[rid]
        if self.allocated[rid] == req.num_tokens:
            req.output_token_ids.extend(range(70, 70 + extra))
        n = min(req.num_tokens, self.allocated[rid] + extra)
        try:
            self.bm.ensure(rid, req.cache_kind, n)
        except OutOfBlocks:
            return
        self.allocated[rid] = n

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def convert_to_kv(self, data):
        hidden = sorted(rid for rid, r in self.reqs.items() if r.cache_kind is HIDDEN and r.num_computed_tokens)
        if not hidden:
            return
        rid = data.draw(st.sampled_from(hidden))
        req = self.reqs[rid]
        old_content = {b: dict(self.content[b]) for b in self.bm.table(rid) if b in self.content}
        try:
            self.bm.convert(rid, KV, req.num_computed_tokens)
        except OutOfBlocks:
            return
        for b, c in old_content.items():  # blocks others hold were not touched
            if self.bm._refs[b] > 0:
                assert self.content[b] == c
        req.cache_kind = KV
        self.allocated[rid] = req.num_computed_tokens
        self.write(rid, 0, req.num_computed_tokens)

    @precondition(lambda self: self.reqs)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.reqs)))
        self.bm.free(rid)
        del self.reqs[rid], self.allocated[rid]

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check()
        held = {b for rid in self.bm.owners() for b in self.bm.table(rid)}
        held |= {b for blocks in self.bm._lent.values() for b in blocks}  # read by a conversion this step
        assert len(held) + self.bm.num_free == self.bm.num_blocks
        for rid, req in self.reqs.items():
            per = self.per(req.cache_kind)
            assert self.bm.held(rid) == -(-self.allocated[rid] // per)
            for b in self.bm.table(rid)[:req.num_computed_tokens // per]:  # computed blocks keep their tokens
                assert self.content[b], b


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def computed(bm: BlockManager, rid: str, tokens: list[int], kind=KV) -> Request:
    req = request(rid, tokens)
    assert bm.allocate(req, kind, bm.cached_prefix(req, kind), len(tokens))
    req.num_computed_tokens = len(tokens)
    bm.publish(req)
    return req


def test_eviction_takes_the_least_recently_released_and_the_tail_first():
    bm = BlockManager(4, 2, enable_caching=True)
    computed(bm, "a", [1, 2, 3, 4])  # blocks 0, 1
    computed(bm, "b", [5, 6, 7, 8])  # blocks 2, 3
    bm.free("b")
    bm.free("a")  # released after b: a's blocks are evicted last
    assert bm.num_free == 4 and bm.num_evictable == 4
    bm.ensure("c", KV, 2)
    assert bm.table("c") == (3,)  # b's tail block went first
    hit = bm.cached_prefix(request("d", [5, 6, 9]), KV)
    assert hit.blocks == (2,) and hit.evictable == 1  # b's first block is still cached
    assert bm.cached_prefix(request("e", [1, 2, 3, 4, 9]), KV).blocks == (0, 1)


def test_shared_blocks_stay_until_the_last_holder_lets_go():
    bm = BlockManager(6, 2, enable_caching=True)
    computed(bm, "a", [1, 2, 3, 4, 5])
    b = request("b", [1, 2, 3, 4, 9])
    prefix = bm.cached_prefix(b, KV)
    assert prefix.tokens == 4 and prefix.evictable == 0 and prefix.shared_as(KV) == 2
    assert bm.allocate(b, KV, prefix, 5)
    assert bm.num_shared == 2 and bm.table("b")[:2] == bm.table("a")[:2]
    assert bm.shared_each(["a", "b"]) == [2, 2] and bm.held_alone("a") == 1
    bm.free("a")
    bm.check()
    assert bm.num_shared == 0 and bm.num_free == 6 - 3  # a's own last block is free; the shared two are b's
    bm.free("b")
    assert bm.num_evictable == 2 and bm.num_free == 6


def test_last_token_block_is_never_taken_from_the_cache():
    bm = BlockManager(8, 2, enable_caching=True)
    computed(bm, "a", [1, 2, 3, 4])
    assert bm.cached_prefix(request("b", [1, 2, 3, 4]), KV).tokens == 2  # the block of token 4 is computed again
    assert bm.cached_prefix(request("c", [1, 2, 3, 4, 5]), KV).tokens == 4


def test_kv_request_converts_a_cached_hidden_prefix_and_hidden_never_reads_kv():
    bm = BlockManager(12, 2, 4, enable_caching=True)
    computed(bm, "h", [1, 2, 3, 4, 5, 6, 7, 8, 9], HIDDEN)  # hidden blocks of 4 tokens: two published
    kv = request("k", [1, 2, 3, 4, 5, 6, 7, 8, 10])
    prefix = bm.cached_prefix(kv, KV)
    assert prefix.source is HIDDEN and prefix.tokens == 8 and prefix.shared_as(KV) == 0
    assert bm.allocate(kv, KV, prefix, 9)
    assert bm.held("k") == 5  # its own KV blocks for all 9 tokens; the hidden ones are only read
    bm.free("h")
    assert bm.num_evictable == 0  # still held for the conversion
    kv.num_computed_tokens = 9
    bm.publish(kv)
    assert bm.num_evictable == 2  # the hidden prefix is released, still cached
    assert bm.cached_prefix(request("x", [1, 2, 3, 4, 5, 6, 7, 8, 11]), HIDDEN).source is HIDDEN
    assert bm.cached_prefix(request("w", [1, 2, 3, 4, 5, 6, 7, 8, 11]), KV).blocks == bm.table("k")[:4]
    computed(bm, "kv-only", [20, 21, 22, 23, 24])
    assert bm.cached_prefix(request("y", [20, 21, 22, 23, 24, 25]), HIDDEN) is NO_PREFIX
    assert bm.cached_prefix(request("z", [1, 2, 3, 4, 5, 6, 7, 8, 12]), KV, convert=False).source is KV


def test_keys_chain_from_the_first_token_and_differ_by_kind():
    a, b = request("a", [1, 2, 3, 4, 5, 6]), request("b", [9, 2, 3, 4, 5, 6])
    ka, kb = block_keys(a, KV, 2, 3), block_keys(b, KV, 2, 3)
    assert all(x != y for x, y in zip(ka, kb))  # same tokens 3..6, other prefix: other keys
    assert block_keys(a, HIDDEN, 2, 1) != ka[:1]


def test_caching_off_keeps_nothing():
    bm = BlockManager(4, 2)
    computed(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    assert bm.num_evictable == 0 and bm.cached_prefix(request("b", [1, 2, 3, 4, 5]), KV) is NO_PREFIX


def test_a_salted_request_shares_cached_blocks_only_with_its_salt():
    """cache_salt: the chains of other salts (and of none) never meet, so no prefix is shared across."""
    def salted(rid: str, salt: str | None) -> Request:
        return Request(rid, [1, 2, 3, 4, 5], SamplingParams(max_tokens=8, cache_salt=salt), 0.0, 1.0, 1.0)

    bm = BlockManager(12, 2, enable_caching=True)
    computed(bm, "plain", [1, 2, 3, 4, 5])
    for rid, salt in (("t1", "tenant-1"), ("t2", "tenant-2")):
        req = salted(rid, salt)
        assert bm.cached_prefix(req, KV) is NO_PREFIX
        assert bm.allocate(req, KV, NO_PREFIX, 5)
        req.num_computed_tokens = 5
        bm.publish(req)
    assert bm.cached_prefix(salted("t1-again", "tenant-1"), KV).blocks == bm.table("t1")[:2]
    assert bm.cached_prefix(salted("t2-again", "tenant-2"), KV).blocks == bm.table("t2")[:2]
    assert bm.cached_prefix(request("plain-again", [1, 2, 3, 4, 5]), KV).blocks == bm.table("plain")[:2]
    assert len({bm.table(r)[0] for r in ("plain", "t1", "t2")}) == 3
