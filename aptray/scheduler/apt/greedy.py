"""The selection step of the apt scheduler: a greedy multiple-choice knapsack (numpy, torch-free).

Each candidate request may run as KV (m blocks, value p) or as hidden (m_h blocks, value v_h).
As in docs/ARCHITECTURE.md section 3, the pair becomes two items, "hidden" (m_h, v_h) and "upgrade to KV"
(m - m_h, p - v_h), taken in order of value per block. The split is kept only when the
upgrade's value per block is no higher than the hidden item's, so that taking items in that
order never takes an upgrade before its hidden item; this is the convex-hull (LP-dominance)
condition of the multiple-choice knapsack and equals the paper's v_h >= p/2 rule when m_h = m/2.
When it fails one option dominates and the request has a single item.

Violators (requests already past their SLO) carry no value: they are served after every
non-violator, in arrival (row) order, as hidden when hidden costs no time (hidden_value >= value,
i.e. alpha <= 0: the smaller option leaves more memory to the others), else as KV where it fits.

Guarantee: if the memory budget is the one that binds, the value taken is at least half the
optimum (greedy prefix + the first item that did not fit >= LP bound >= optimum, and the guard
returns the better of the two). Token and sequence budgets are hard caps that are never
exceeded, but with several budgets binding at once no greedy of this kind has a constant bound
(multi-dimensional knapsack); see docs/SCHEDULER.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aptray.request import CacheKind

# per request, the kind chosen: a CacheKind's code, or NONE (KIND_OF_CODE maps a code back)
NONE, KV, HIDDEN = 0, CacheKind.KV.code, CacheKind.HIDDEN.code
UPGRADE = 3  # an item kind only: the hidden -> KV increment of a split request


@dataclass(frozen=True)
class Candidates:
    """One row per request, rows in arrival order (the order ties and violators are served in)."""
    value: np.ndarray          # float: value as KV (pending time p)
    kv_blocks: np.ndarray      # int: blocks as KV; 0 = no KV option
    hidden_blocks: np.ndarray  # int: blocks as hidden; 0 = no hidden option
    hidden_value: np.ndarray   # float: value as hidden (v_h = p - U * alpha * m_h)
    tokens: np.ndarray         # int: tokens this iteration computes for the request
    violator: np.ndarray       # bool
    # int: blocks an upgrade to KV weighs against Budgets.upgrade_blocks (None: kv - hidden blocks now).
    # The apt scheduler passes what KV holds beyond hidden over the request's expected life: a
    # 21-token prompt is 1 block more as KV now, but 8 more by the time its 250 tokens are out
    upgrade_blocks: np.ndarray | None = None
    # int: tokens of the step budget the hidden option takes (None: `tokens`). They differ when the
    # request's cached prefix differs by kind; an upgrade item takes what KV needs beyond hidden
    hidden_tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.value)


@dataclass(frozen=True)
class Budgets:
    blocks: int
    tokens: int
    seqs: int
    upgrade_blocks: int | None = None  # blocks the upgrade items may take in all (None: no cap of their own)
    violator_blocks: int | None = None  # blocks the violators may take in all (None: what is left)


@dataclass(frozen=True)
class Selection:
    kind: np.ndarray  # int8 per row: NONE, KV or HIDDEN
    value: float      # value of the non-violators taken
    guard_used: bool  # the guard (or, with caps binding, another order) replaced the density greedy


@dataclass
class _Items:
    """The knapsack items built from Candidates (parallel arrays)."""
    row: np.ndarray
    kind: np.ndarray      # KV, HIDDEN, or UPGRADE (hidden -> KV increment)
    value: np.ndarray
    blocks: np.ndarray
    tokens: np.ndarray
    seqs: np.ndarray
    partner: np.ndarray   # for an upgrade, its hidden item's index; else -1
    violator: np.ndarray
    upgrade_blocks: np.ndarray  # an upgrade's blocks (its weight in the upgrade budget); else 0


def _fits_alone(blocks, tokens, b: Budgets) -> np.ndarray:
    return (blocks > 0) & (blocks <= b.blocks) & (tokens <= b.tokens) & (b.seqs >= 1)


def build_items(c: Candidates, b: Budgets) -> _Items:
    n = len(c)
    rows = np.arange(n)
    value = np.asarray(c.value, dtype=float)
    kvb = np.asarray(c.kv_blocks, dtype=np.int64)
    hb = np.asarray(c.hidden_blocks, dtype=np.int64)
    vh = np.asarray(c.hidden_value, dtype=float)
    tok = np.asarray(c.tokens, dtype=np.int64)
    tok_h = tok if c.hidden_tokens is None else np.asarray(c.hidden_tokens, dtype=np.int64)
    viol = np.asarray(c.violator, dtype=bool)

    has_kv = _fits_alone(kvb, tok, b)
    has_h = _fits_alone(hb, tok_h, b) & (viol | (vh > 0) | ((kvb == 0) & (vh >= 0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        dens_h = np.where(hb > 0, vh / np.maximum(hb, 1), 0.0)
        dens_u = np.where(kvb > hb, (value - vh) / np.maximum(kvb - hb, 1), np.inf)
    split = ~viol & has_kv & has_h & (kvb > hb) & (value > vh) & (dens_h >= dens_u)
    # single-option rows: the better option when both exist (hidden if it is worth as much and
    # smaller). Violators too: they run on what the others leave, so when hidden costs no time
    # (v_h >= p, i.e. alpha <= 0) they take the smaller hidden option, else KV
    only_h = ~split & has_h & (~has_kv | ((vh >= value) & (hb <= kvb)))
    only_kv = ~split & ~only_h & has_kv

    # items in arrival order, a row's hidden item just before its upgrade, so that a stable sort
    # on any key breaks ties by arrival, hidden first
    first = np.where(only_kv, KV, np.where(only_h | split, HIDDEN, 0))
    count = (first > 0).astype(np.int64) + split
    pos = np.cumsum(count) - count  # index of each row's first item
    total = int(count.sum())
    item_row = np.repeat(rows, count)
    kind = np.empty(total, np.int64)
    ival, iblk = np.empty(total), np.empty(total, np.int64)
    itok, iseq = np.zeros(total, np.int64), np.zeros(total, np.int64)
    has = first > 0
    fp = pos[has]
    kind[fp] = first[has]
    ival[fp] = np.where(first[has] == KV, value[has], vh[has])
    iblk[fp] = np.where(first[has] == KV, kvb[has], hb[has])
    itok[fp] = np.where(first[has] == KV, tok[has], tok_h[has])
    iseq[fp] = 1
    up = pos[split] + 1
    kind[up] = UPGRADE
    ival[up] = value[split] - vh[split]
    iblk[up] = kvb[split] - hb[split]
    itok[up] = np.maximum(tok[split] - tok_h[split], 0)
    partner = np.full(total, -1, np.int64)
    partner[up] = up - 1
    ublk = np.zeros(total, np.int64)
    ublk[up] = iblk[up] if c.upgrade_blocks is None else np.asarray(c.upgrade_blocks, np.int64)[split]
    return _Items(item_row, kind, ival, iblk, itok, iseq, partner, viol[item_row], ublk)


def _key(items: _Items, raw: np.ndarray) -> np.ndarray:
    """A priority key per item (higher first); an upgrade's is capped at its hidden item's so that
    it never comes first. Ties go by item index: arrival, hidden before upgrade."""
    key = raw.astype(float)
    ups = np.flatnonzero(items.partner >= 0)
    key[ups] = np.minimum(key[ups], key[items.partner[ups]])
    return key


def _sorted(key: np.ndarray, among: np.ndarray) -> np.ndarray:
    """among (ascending indices) by descending key, stable."""
    return among[np.argsort(-key[among], kind="stable")]


HEAD_EXTRA = 256  # items sorted beyond twice the sequence budget before looking further


def _scan(items: _Items, key: np.ndarray, among: np.ndarray, remaining: np.ndarray, taken: np.ndarray,
          rejected: np.ndarray) -> int:
    """_fill over `among` in key order, sorting only the head that can matter: after the head,
    only items that still fit on their own can be taken, and those are few."""
    head_size = int(min(2 * remaining[2], among.size)) + HEAD_EXTRA
    if among.size <= 2 * head_size:
        return _fill(_sorted(key, among), items, remaining, taken, rejected)
    keys = key[among]
    kth = np.partition(keys, among.size - head_size)[among.size - head_size]
    head, rest = among[keys >= kth], among[keys < kth]  # ties stay together: the order is exact
    first = _fill(_sorted(key, head), items, remaining, taken, rejected)
    if first < 0:  # the head was all taken: the first rejection lies in the rest, in full order
        return _fill(_sorted(key, rest), items, remaining, taken, rejected)
    fit = ((items.blocks[rest] <= remaining[0]) & (items.tokens[rest] <= remaining[1])
           & (items.seqs[rest] <= remaining[2]) & (items.upgrade_blocks[rest] <= remaining[3]))
    rejected[rest[~fit]] = True
    _fill(_sorted(key, rest[fit]), items, remaining, taken, rejected)
    return first


def _fill(order: np.ndarray, items: _Items, remaining: np.ndarray, taken: np.ndarray,
          rejected: np.ndarray) -> int:
    """Scan `order`, taking every item that fits what remains (updates remaining, taken,
    rejected in place). Vectorised in rounds: each round takes the longest prefix of the items
    that fit on their own, then rejects the item that broke it. Returns the index of the first
    item rejected in the scan, or -1."""
    first_rejected = -1
    idx = order
    while idx.size:
        blk, tok, seq, ub = items.blocks[idx], items.tokens[idx], items.seqs[idx], items.upgrade_blocks[idx]
        alone = (blk <= remaining[0]) & (tok <= remaining[1]) & (seq <= remaining[2]) & (ub <= remaining[3])
        rejected[idx[~alone]] = True
        part = items.partner[idx]
        alone &= (part < 0) | ~rejected[np.maximum(part, 0)]
        if first_rejected < 0 and not alone.all():
            first_rejected = int(idx[np.argmin(alone)])
        rejected[idx[~alone]] = True
        idx = idx[alone]
        if not idx.size:
            break
        # the prefix that fits is short (every item holds a block): look at a window of it
        window = idx[:int(min(remaining[0], 2 * remaining[2] + 64)) + 1]
        cb, ct, cs = np.cumsum(items.blocks[window]), np.cumsum(items.tokens[window]), np.cumsum(items.seqs[window])
        cu = np.cumsum(items.upgrade_blocks[window])
        ok = (cb <= remaining[0]) & (ct <= remaining[1]) & (cs <= remaining[2]) & (cu <= remaining[3])
        k = int(np.argmin(ok)) if not ok.all() else window.size
        taken[idx[:k]] = True
        if k:
            remaining -= np.array([cb[k - 1], ct[k - 1], cs[k - 1], cu[k - 1]])
        if k == window.size:  # all of the window fit: go on with the rest, nothing rejected
            idx = idx[k:]
            continue
        if first_rejected < 0:
            first_rejected = int(idx[k])
        rejected[idx[k]] = True
        idx = idx[k + 1:]
    return first_rejected


def _greedy(items: _Items, key: np.ndarray, among: np.ndarray, cap: np.ndarray, guard: bool):
    """Taken mask, remaining budgets and whether the guard fired, for one priority key."""
    taken = np.zeros(len(items.row), bool)
    rejected = np.zeros(len(items.row), bool)
    remaining = cap.copy()
    first = _scan(items, key, among, remaining, taken, rejected)
    if not guard or first < 0:
        return taken, remaining, False
    # 2-approximation guard: the first item that did not fit, alone (an upgrade stands for its
    # whole KV option, i.e. with its hidden item), against everything the greedy took
    alone = _feasible_seed(items, cap, [first] + ([int(items.partner[first])] if items.partner[first] >= 0 else []))
    if items.value[alone].sum() <= items.value[taken].sum():
        return taken, remaining, False
    return _seeded(items, key, among, cap, alone) + (True,)


def _feasible_seed(items: _Items, cap: np.ndarray, seed: list[int]) -> list[int]:
    """A request's option on its own; a KV option whose upgrade part passes the upgrade budget
    falls back to its hidden item (every option already fits the other budgets alone)."""
    if items.upgrade_blocks[seed].sum() > cap[3]:
        return [i for i in seed if items.upgrade_blocks[i] == 0]
    return seed


def _seeded(items: _Items, key: np.ndarray, among: np.ndarray, cap: np.ndarray, seed: list[int]):
    """Take the seed items, then fill the room left in key order (other requests' items only)."""
    seed = _feasible_seed(items, cap, seed)
    taken = np.zeros(len(items.row), bool)
    rejected = np.zeros(len(items.row), bool)
    taken[seed] = True
    remaining = cap - np.array([items.blocks[seed].sum(), items.tokens[seed].sum(), items.seqs[seed].sum(),
                                items.upgrade_blocks[seed].sum()])
    rest = among[~np.isin(items.row[among], items.row[seed])]
    _scan(items, key, rest, remaining, taken, rejected)
    return taken, remaining


def _whole_value(items: _Items) -> np.ndarray:
    """Per item, the value of its request's option on its own (an upgrade: the whole KV option)."""
    whole = items.value.copy()
    ups = np.flatnonzero(items.partner >= 0)
    whole[ups] += items.value[items.partner[ups]]
    return whole


def _best_single(items: _Items, nonviol: np.ndarray) -> list[int]:
    """The most valuable request option on its own (KV = hidden + upgrade when split)."""
    best = int(nonviol[np.argmax(_whole_value(items)[nonviol])])
    return [best] + ([int(items.partner[best])] if items.partner[best] >= 0 else [])


def _slot_bound(items: _Items, nonviol: np.ndarray, seqs: int) -> float:
    """An upper bound on any feasible value: the seqs most valuable request options. When the
    density greedy already has half of it, the alternatives cannot matter for the guarantee."""
    whole = _whole_value(items)[nonviol]
    if whole.size > seqs:
        whole = np.partition(whole, whole.size - seqs)[whole.size - seqs:]
    return float(whole.sum())


def select(c: Candidates, b: Budgets) -> Selection:
    """Choose which requests run and as which kind, within the three budgets."""
    items = build_items(c, b)
    nonviol, viol = np.flatnonzero(~items.violator), np.flatnonzero(items.violator)  # ascending
    upgrade_cap = b.blocks if b.upgrade_blocks is None else max(0, b.upgrade_blocks)
    cap = np.array([b.blocks, b.tokens, b.seqs, upgrade_cap], dtype=np.int64)
    density = _key(items, items.value / np.maximum(items.blocks, 1))

    taken, remaining, guard_used = _greedy(items, density, nonviol, cap, guard=True)
    caps_bind = items.tokens[nonviol].sum() > b.tokens or items.seqs[nonviol].sum() > b.seqs
    if nonviol.size and caps_bind and 2 * items.value[taken].sum() < _slot_bound(items, nonviol, b.seqs):
        # the density order is 2-approximate for memory only: with the token or sequence budget
        # binding it can fill the slots with small items, so also try the best single option, the
        # order of value and the order of value per share of all three budgets (Lagrangian-style),
        # keeping the most valuable (no constant bound: see the module doc)
        share = items.blocks / b.blocks + items.tokens / b.tokens + items.seqs / b.seqs
        alternatives = [_seeded(items, density, nonviol, cap, _best_single(items, nonviol))]
        for raw in (_whole_value(items), items.value / np.maximum(share, 1e-12)):
            alternatives.append(_greedy(items, _key(items, raw), nonviol, cap, guard=True)[:2])
        best_value = items.value[taken].sum()
        for alt_taken, alt_remaining in alternatives:
            if items.value[alt_taken].sum() > best_value:
                taken, remaining, guard_used = alt_taken, alt_remaining, True
                best_value = items.value[taken].sum()
    value = float(items.value[taken].sum())
    if b.violator_blocks is not None:  # violators only get the blocks set aside for them
        remaining = remaining.copy()
        remaining[0] = min(int(remaining[0]), max(0, b.violator_blocks))
    _fill(viol, items, remaining, taken, np.zeros(len(items.row), bool))  # arrival order

    kind = np.zeros(len(c), np.int8)
    t_rows, t_kind = items.row[taken], items.kind[taken]
    kind[t_rows[t_kind == HIDDEN]] = HIDDEN
    kind[t_rows[(t_kind == KV) | (t_kind == UPGRADE)]] = KV  # upgrade taken => its hidden was too
    return Selection(kind, value, guard_used)
