"""Property tests of the apt selection step (torch-free): feasibility, determinism, 2-approximation."""
import itertools

import numpy as np
from hypothesis import given, settings, strategies as st

from aptray.scheduler.apt.greedy import HIDDEN, KV, NONE, UPGRADE, Budgets, Candidates, build_items, select


@st.composite
def instances(draw, loose_caps: bool = False):
    n = draw(st.integers(1, 10))
    rows = []
    for _ in range(n):
        tokens = draw(st.integers(1, 64))
        kv = -(-tokens // 4)  # block of 4 KV tokens, 8 hidden tokens (r = 1/2)
        hidden = draw(st.sampled_from([0, -(-tokens // 8)]))  # 0: no hidden option (e.g. a running KV request)
        if draw(st.booleans()) and hidden:
            kv = 0  # a running hidden request: hidden only
        p = draw(st.floats(0.01, 10.0))
        vh = p - draw(st.floats(0.0, 2.0)) * hidden * draw(st.floats(0.0, 1.0))
        violator = draw(st.integers(0, 5)) == 0
        rows.append((0.0 if violator else p, kv, hidden, 0.0 if violator else vh, tokens, violator))
    cols = list(zip(*rows))
    c = Candidates(np.array(cols[0]), np.array(cols[1]), np.array(cols[2]), np.array(cols[3]),
                   np.array(cols[4]), np.array(cols[5]))
    blocks = draw(st.integers(1, 80))
    if loose_caps:
        tokens, seqs = 10**6, 10**6
    else:
        tokens, seqs = draw(st.integers(1, 400)), draw(st.integers(1, 10))
    return c, Budgets(blocks, tokens, seqs)


def used(c: Candidates, kind: np.ndarray):
    kv, hid = kind == KV, kind == HIDDEN
    blocks = c.kv_blocks[kv].sum() + c.hidden_blocks[hid].sum()
    return blocks, c.tokens[kv | hid].sum(), int((kv | hid).sum())


def value_of(c: Candidates, kind: np.ndarray) -> float:
    return float(c.value[kind == KV].sum() + c.hidden_value[kind == HIDDEN].sum())


def brute_force(c: Candidates, b: Budgets) -> float:
    n = len(c)
    choices = np.array(list(itertools.product((NONE, KV, HIDDEN), repeat=n)), dtype=np.int8)
    kv, hid = choices == KV, choices == HIDDEN
    allowed = ~(kv & (c.kv_blocks == 0)) & ~(hid & (c.hidden_blocks == 0))
    ok = allowed.all(axis=1)
    ok &= (kv * c.kv_blocks + hid * c.hidden_blocks).sum(axis=1) <= b.blocks
    ok &= ((kv | hid) * c.tokens).sum(axis=1) <= b.tokens
    ok &= (kv | hid).sum(axis=1) <= b.seqs
    values = (kv * c.value + hid * c.hidden_value).sum(axis=1)
    return float(values[ok].max())  # all-NONE is always feasible


@settings(max_examples=300, deadline=None)
@given(instances())
def test_budgets_never_exceeded(inst):
    c, b = inst
    kind = select(c, b).kind
    blocks, tokens, seqs = used(c, kind)
    assert blocks <= b.blocks and tokens <= b.tokens and seqs <= b.seqs
    assert not ((kind == KV) & (c.kv_blocks == 0)).any()
    assert not ((kind == HIDDEN) & (c.hidden_blocks == 0)).any()


@settings(max_examples=100, deadline=None)
@given(instances())
def test_same_input_same_plan(inst):
    c, b = inst
    a, again = select(c, b), select(c, b)
    assert np.array_equal(a.kind, again.kind) and a.value == again.value


@settings(max_examples=300, deadline=None)
@given(instances(loose_caps=True))
def test_half_of_optimum_when_memory_binds(inst):
    c, b = inst
    sel = select(c, b)
    assert abs(sel.value - value_of(c, sel.kind)) < 1e-9  # violators carry no value
    assert sel.value >= brute_force(c, b) / 2 - 1e-9


@settings(max_examples=300, deadline=None)
@given(instances())
def test_half_of_optimum_with_every_budget(inst):
    """Empirical, not a theorem: with the token and sequence budgets binding too, the best of the
    density greedy, the best single option and the value and combined-weight orders has met half
    the optimum on every instance tried (a fixed, derandomised set here; 3,000 random ones when
    written). The proven bound is the memory-only one above."""
    c, b = inst
    assert select(c, b).value >= brute_force(c, b) / 2 - 1e-9


def test_sequence_budget_prefers_the_valuable_ones():
    # three dense small requests, three worth far more per slot: three slots
    c = Candidates(np.array([1.0, 1, 1, 30, 30, 30, 31]), np.array([1, 1, 1, 33, 33, 33, 100]), np.zeros(7, int),
                   np.zeros(7), np.ones(7, int), np.zeros(7, bool))
    assert list(select(c, Budgets(100, 1000, 3)).kind) == [NONE] * 3 + [KV] * 3 + [NONE]


def test_guard_takes_the_big_item():
    # a dense small item, then one worth far more that no longer fits beside it
    c = Candidates(np.array([1.0, 9.0]), np.array([1, 10]), np.array([0, 0]), np.array([0.0, 0.0]),
                   np.array([4, 40]), np.array([False, False]))
    sel = select(c, Budgets(10, 1000, 10))
    assert sel.guard_used and list(sel.kind) == [NONE, KV]


def test_hidden_fits_where_kv_does_not():
    c = Candidates(np.array([1.0, 1.0]), np.array([4, 4]), np.array([2, 2]), np.array([0.9, 0.9]),
                   np.array([16, 16]), np.array([False, False]))
    assert list(select(c, Budgets(4, 1000, 10)).kind) == [HIDDEN, HIDDEN]
    assert list(select(c, Budgets(8, 1000, 10)).kind) == [KV, KV]


def test_violators_last_in_arrival_order():
    # the violators come first in arrival order and are small; they still go after the others
    c = Candidates(np.array([0.0, 0.0, 1.0, 1.0]), np.array([1, 1, 2, 2]), np.array([0, 0, 0, 0]),
                   np.zeros(4), np.array([4, 4, 8, 8]), np.array([True, True, False, False]))
    assert list(select(c, Budgets(5, 1000, 10)).kind) == [KV, NONE, KV, KV]


@settings(max_examples=300, deadline=None)
@given(instances(), st.integers(0, 40))
def test_upgrade_budget_never_exceeded(inst, upgrade_blocks):
    """Upgrades (hidden -> KV increments) may be capped below the memory budget: the running set's
    expected growth is kept from them. A request split into hidden + upgrade items that goes KV
    took its upgrade, whose blocks count against the cap."""
    c, b = inst
    b = Budgets(b.blocks, b.tokens, b.seqs, upgrade_blocks)
    kind = select(c, b).kind
    blocks, tokens, seqs = used(c, kind)
    assert blocks <= b.blocks and tokens <= b.tokens and seqs <= b.seqs
    items = build_items(c, b)
    split = np.zeros(len(c), bool)
    split[items.row[items.kind == UPGRADE]] = True
    upgraded = (kind == KV) & split
    assert int((c.kv_blocks[upgraded] - c.hidden_blocks[upgraded]).sum()) <= upgrade_blocks


def test_upgrade_budget_keeps_requests_hidden():
    # hidden costs a little time (v_h < p): with room, both go KV; with no upgrade room, both hidden
    c = Candidates(np.array([1.0, 1.0]), np.array([4, 4]), np.array([2, 2]), np.array([0.99, 0.99]),
                   np.array([16, 16]), np.array([False, False]))
    assert list(select(c, Budgets(8, 1000, 10)).kind) == [KV, KV]
    assert list(select(c, Budgets(8, 1000, 10, upgrade_blocks=2)).kind) == [KV, HIDDEN]
    assert list(select(c, Budgets(8, 1000, 10, upgrade_blocks=0)).kind) == [HIDDEN, HIDDEN]


def test_violators_take_hidden_when_it_costs_no_time():
    # violators run on what is left: the smaller hidden option when hidden is no slower (v_h >= p)
    free = Candidates(np.zeros(2), np.array([4, 4]), np.array([2, 2]), np.zeros(2), np.array([16, 16]),
                      np.array([True, True]))
    assert list(select(free, Budgets(8, 1000, 10)).kind) == [HIDDEN, HIDDEN]
    # hidden slows every step (alpha > 0: v_h < 0 = p): KV where it fits
    slow = Candidates(np.zeros(2), np.array([4, 4]), np.array([2, 2]), np.full(2, -0.1), np.array([16, 16]),
                      np.array([True, True]))
    assert list(select(slow, Budgets(8, 1000, 10)).kind) == [KV, KV]


@settings(max_examples=200, deadline=None)
@given(instances(), st.integers(0, 40))
def test_violator_budget_never_exceeded(inst, violator_blocks):
    """Violators may be kept to the blocks the running set will not grow into."""
    c, b = inst
    b = Budgets(b.blocks, b.tokens, b.seqs, violator_blocks=violator_blocks)
    kind = select(c, b).kind
    blocks, tokens, seqs = used(c, kind)
    assert blocks <= b.blocks and tokens <= b.tokens and seqs <= b.seqs
    v = c.violator
    assert c.kv_blocks[v & (kind == KV)].sum() + c.hidden_blocks[v & (kind == HIDDEN)].sum() <= violator_blocks
    # the non-violators are chosen as without the cap
    free = select(c, Budgets(b.blocks, b.tokens, b.seqs)).kind
    assert np.array_equal(kind[~v], free[~v])


def test_hidden_option_takes_its_own_tokens_and_an_upgrade_the_difference():
    """A request whose cached prefix differs by kind: as hidden it computes 10 tokens, as KV 30. The
    hidden item fits a 12-token budget alone; the KV option (hidden + upgrade) takes 30."""
    c = Candidates(np.array([1.0]), np.array([8]), np.array([4]), np.array([0.9]), np.array([30]),
                   np.array([False]), hidden_tokens=np.array([10]))
    items = build_items(c, Budgets(100, 100, 4))
    assert list(items.kind) == [HIDDEN, UPGRADE] and list(items.tokens) == [10, 20]
    assert select(c, Budgets(100, 12, 4)).kind[0] == HIDDEN
    assert select(c, Budgets(100, 30, 4)).kind[0] == KV
