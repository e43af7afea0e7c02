"""The selection step of the apt scheduler: a greedy multiple-choice knapsack (numpy, torch-free).

Each candidate request may run as KV (m blocks, value p) or as hidden (m_h blocks, value v_h).
Following DESIGN section 3 the pair becomes two items, "hidden" (m_h, v_h) and "upgrade to KV"
(m - m_h, p - v_h), taken in order of value per block. The split is kept only when the
upgrade's value per block is no higher than the hidden item's, so that taking items in that
order never takes an upgrade before its hidden item; this is the convex-hull (LP-dominance)
condition of the multiple-choice knapsack and equals the paper's v_h >= p/2 rule when m_h = m/2.
When it fails one option dominates and the request has a single item.

Violators (requests already past their SLO) carry no value: they are served after every
non-violator, in arrival (row) order, as KV where they may be (hidden only where KV is absent).

Guarantee: if the memory budget is the one that binds, the value taken is at least half the
optimum (greedy prefix + the first item that did not fit >= LP bound >= optimum, and the guard
returns the better of the two). Token and sequence budgets are hard caps that are never
exceeded, but with several budgets binding at once no greedy of this kind has a constant bound
(multi-dimensional knapsack); see docs/SCHEDULER.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NONE, KV, HIDDEN = 0, 1, 2  # chosen kind per request


@dataclass(frozen=True)
class Candidates:
    """One row per request, rows in arrival order (the order ties and violators are served in)."""
    value: np.ndarray          # float: value as KV (pending time p)
    kv_blocks: np.ndarray      # int: blocks as KV; 0 = no KV option
    hidden_blocks: np.ndarray  # int: blocks as hidden; 0 = no hidden option
    hidden_value: np.ndarray   # float: value as hidden (v_h = p - U * alpha * m_h)
    tokens: np.ndarray         # int: tokens this iteration computes for the request
    violator: np.ndarray       # bool

    def __len__(self) -> int:
        return len(self.value)


@dataclass(frozen=True)
class Budgets:
    blocks: int
    tokens: int
    seqs: int


@dataclass(frozen=True)
class Selection:
    kind: np.ndarray  # int8 per row: NONE, KV or HIDDEN
    value: float      # value of the non-violators taken
    guard_used: bool  # the guard (or, with caps binding, another order) replaced the density greedy

    def rows(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kind == kind)


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


UPGRADE = 3


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
    viol = np.asarray(c.violator, dtype=bool)

    has_kv = _fits_alone(kvb, tok, b)
    has_h = _fits_alone(hb, tok, b) & (viol | (vh > 0) | ((kvb == 0) & (vh >= 0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        dens_h = np.where(hb > 0, vh / np.maximum(hb, 1), 0.0)
        dens_u = np.where(kvb > hb, (value - vh) / np.maximum(kvb - hb, 1), np.inf)
    split = ~viol & has_kv & has_h & (kvb > hb) & (value > vh) & (dens_h >= dens_u)
    # single-option rows: the better option when both exist (hidden only if it is worth as much)
    only_h = ~split & has_h & (~has_kv | (~viol & (vh >= value) & (hb <= kvb)))
    only_kv = ~split & ~only_h & has_kv  # violators land here when KV fits: KV where they may

    # singles and hidden halves first so that partners' indices are known
    single_kv = rows[only_kv]
    single_h = rows[only_h]
    split_rows = rows[split]
    n_kv, n_h, n_s = len(single_kv), len(single_h), len(split_rows)
    item_row = np.concatenate([single_kv, single_h, split_rows, split_rows])
    kind = np.concatenate([np.full(n_kv, KV), np.full(n_h, HIDDEN), np.full(n_s, HIDDEN), np.full(n_s, UPGRADE)])
    ival = np.concatenate([value[single_kv], vh[single_h], vh[split_rows], value[split_rows] - vh[split_rows]])
    iblk = np.concatenate([kvb[single_kv], hb[single_h], hb[split_rows], kvb[split_rows] - hb[split_rows]])
    itok = np.concatenate([tok[single_kv], tok[single_h], tok[split_rows], np.zeros(n_s, np.int64)])
    iseq = np.concatenate([np.ones(n_kv + n_h + n_s, np.int64), np.zeros(n_s, np.int64)])
    partner = np.full(len(item_row), -1, np.int64)
    first_split = n_kv + n_h
    partner[first_split + n_s:] = np.arange(first_split, first_split + n_s)
    return _Items(item_row, kind, ival, iblk, itok, iseq, partner, viol[item_row])


def _order(items: _Items, key: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Items of `among`, highest key first; an upgrade never before its hidden item (its key is
    capped at its partner's); ties by arrival, hidden before upgrade."""
    key = key.copy()
    ups = np.flatnonzero(items.partner >= 0)
    key[ups] = np.minimum(key[ups], key[items.partner[ups]])
    # lexsort sorts by the last key first
    return among[np.lexsort(((items.kind == UPGRADE)[among], items.row[among], -key[among]))]


def _priority(items: _Items) -> tuple[np.ndarray, np.ndarray]:
    """Non-violator items by value per block; violator items in arrival order."""
    viol = np.flatnonzero(items.violator)
    viol = viol[np.lexsort(((items.kind == UPGRADE)[viol], items.row[viol]))]
    density = items.value / np.maximum(items.blocks, 1)
    return _order(items, density, np.flatnonzero(~items.violator)), viol


def _fill(order: np.ndarray, items: _Items, remaining: np.ndarray, taken: np.ndarray,
          rejected: np.ndarray) -> int:
    """Scan `order`, taking every item that fits what remains (updates remaining, taken,
    rejected in place). Vectorised in rounds: each round takes the longest prefix of the items
    that fit on their own, then rejects the item that broke it. Returns the index of the first
    item rejected in the scan, or -1."""
    first_rejected = -1
    idx = order
    while idx.size:
        blk, tok, seq = items.blocks[idx], items.tokens[idx], items.seqs[idx]
        alone = (blk <= remaining[0]) & (tok <= remaining[1]) & (seq <= remaining[2])
        rejected[idx[~alone]] = True
        part = items.partner[idx]
        alone &= (part < 0) | ~rejected[np.maximum(part, 0)]
        if first_rejected < 0 and not alone.all():
            first_rejected = int(idx[np.argmin(alone)])
        rejected[idx[~alone]] = True
        idx = idx[alone]
        if not idx.size:
            break
        cum = np.stack([np.cumsum(items.blocks[idx]), np.cumsum(items.tokens[idx]), np.cumsum(items.seqs[idx])])
        ok = (cum <= remaining[:, None]).all(axis=0)
        k = int(np.argmin(ok)) if not ok.all() else idx.size
        taken[idx[:k]] = True
        remaining -= cum[:, k - 1] if k else 0
        if k == idx.size:
            break
        if first_rejected < 0:
            first_rejected = int(idx[k])
        rejected[idx[k]] = True
        idx = idx[k + 1:]
    return first_rejected


def _greedy(items: _Items, order: np.ndarray, cap: np.ndarray, guard: bool):
    """Taken mask, remaining budgets and whether the guard fired, for one priority order."""
    taken = np.zeros(len(items.row), bool)
    rejected = np.zeros(len(items.row), bool)
    remaining = cap.copy()
    first = _fill(order, items, remaining, taken, rejected)
    if not guard or first < 0:
        return taken, remaining, False
    # 2-approximation guard: the first item that did not fit, alone (an upgrade stands for its
    # whole KV option, i.e. with its hidden item), against everything the greedy took
    alone = [first] + ([int(items.partner[first])] if items.partner[first] >= 0 else [])
    if items.value[alone].sum() <= items.value[taken].sum():
        return taken, remaining, False
    return _seeded(items, order, cap, alone) + (True,)


def _seeded(items: _Items, order: np.ndarray, cap: np.ndarray, seed: list[int]):
    """Take the seed items, then fill the room left in priority order (others' items only)."""
    taken = np.zeros(len(items.row), bool)
    rejected = np.zeros(len(items.row), bool)
    taken[seed] = True
    remaining = cap - np.array([items.blocks[seed].sum(), items.tokens[seed].sum(), items.seqs[seed].sum()])
    rest = order[~np.isin(items.row[order], items.row[seed])]
    _fill(rest, items, remaining, taken, rejected)
    return taken, remaining


def _best_single(items: _Items, nonviol: np.ndarray) -> list[int]:
    """The most valuable request option on its own (KV = hidden + upgrade when split)."""
    whole = _whole_value(items)
    best = int(nonviol[np.argmax(whole[nonviol])])
    return [best] + ([int(items.partner[best])] if items.partner[best] >= 0 else [])


def _whole_value(items: _Items) -> np.ndarray:
    whole = items.value.copy()
    ups = np.flatnonzero(items.partner >= 0)
    whole[ups] += items.value[items.partner[ups]]
    return whole


def _secondary_orders(items: _Items, nonviol: np.ndarray, b: Budgets) -> list[np.ndarray]:
    """Orders worth trying when the token or sequence budget binds: by value, and by value per
    share of all three budgets (a Lagrangian-style combined weight)."""
    share = items.blocks / b.blocks + items.tokens / b.tokens + items.seqs / b.seqs
    return [_order(items, _whole_value(items), nonviol),
            _order(items, items.value / np.maximum(share, 1e-12), nonviol)]


def select(c: Candidates, b: Budgets) -> Selection:
    """Choose which requests run and as which kind, within the three budgets."""
    items = build_items(c, b)
    nonviol, viol = _priority(items)
    cap = np.array([b.blocks, b.tokens, b.seqs], dtype=np.int64)

    taken, remaining, guard_used = _greedy(items, nonviol, cap, guard=True)
    caps_bind = items.tokens[nonviol].sum() > b.tokens or items.seqs[nonviol].sum() > b.seqs
    if nonviol.size and caps_bind:
        # the density order is 2-approximate for memory only: with the token or sequence budget
        # binding it can fill the slots with small items, so also try the best single option and
        # two other orders, keeping the most valuable (no constant bound: see the module doc)
        best_value = items.value[taken].sum()
        alternatives = [_seeded(items, nonviol, cap, _best_single(items, nonviol))]
        alternatives += [_greedy(items, o, cap, guard=True)[:2] for o in _secondary_orders(items, nonviol, b)]
        for alt_taken, alt_remaining in alternatives:
            if items.value[alt_taken].sum() > best_value:
                taken, remaining, guard_used = alt_taken, alt_remaining, True
                best_value = items.value[taken].sum()
    value = float(items.value[taken].sum())
    _fill(viol, items, remaining, taken, np.zeros(len(items.row), bool))

    kind = np.zeros(len(c), np.int8)
    t_rows, t_kind = items.row[taken], items.kind[taken]
    kind[t_rows[t_kind == HIDDEN]] = HIDDEN
    kind[t_rows[(t_kind == KV) | (t_kind == UPGRADE)]] = KV  # upgrade taken => its hidden was too
    return Selection(kind, value, guard_used)
