"""The CPU fast paths equal the torch references (ragged contexts, partial blocks, MHA and GQA)."""
from __future__ import annotations

import pytest
import torch

from aptray_kernels import cpu, reference
from aptray_kernels.cpu_mirror import DecodeMirror, buckets


def _case(block_size, num_heads, n_kv, d=48, head_dim=8, lens=(1, 7, 21, 70), seed=0):
    g = torch.Generator().manual_seed(seed)
    per_row = [-(-n // block_size) for n in lens]
    width = max(per_row)
    num_blocks = sum(per_row) + 3
    ids = torch.randperm(num_blocks, generator=g)
    tables, at = [], 0
    for n in per_row:
        tables.append(ids[at:at + n].tolist() + [0] * (width - n))
        at += n
    kv = torch.randn(num_blocks, 2, block_size, n_kv, head_dim, generator=g)
    hidden = torch.randn(num_blocks, block_size, d, generator=g)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g)
    w = [torch.randn(n_kv * head_dim, d, generator=g) * 0.2 for _ in range(2)]
    b = [torch.randn(n_kv * head_dim, generator=g) for _ in range(2)]
    return q, kv, hidden, torch.tensor(tables), torch.tensor(lens), w, b


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_cpu_paths_equal_references(block_size, num_heads, n_kv):
    q, kv, hidden, tables, lens, (wk, wv), (bk, bv) = _case(block_size, num_heads, n_kv)
    for max_len in (1, int(lens.max())):
        assert torch.equal(cpu.gather_hidden(hidden, tables, max_len), reference.gather_hidden(hidden, tables, max_len))
    torch.testing.assert_close(cpu.paged_decode_attention(q, kv, tables, lens, 0.3),
                               reference.paged_decode_attention(q, kv, tables, lens, 0.3))
    torch.testing.assert_close(cpu.absorbed_decode_attention(q, hidden, tables, lens, wk, wv, bv, 0.3),
                               reference.absorbed_decode_attention(q, hidden, tables, lens, wk, wv, bv, 0.3))
    slots = torch.tensor([0, 5, 3 * block_size + 1, kv.shape[0] * block_size - 1])
    k_new, v_new = torch.randn(4, n_kv, 8), torch.randn(4, n_kv, 8)
    ours, ref = kv.clone(), kv.clone()
    cpu.write_kv(ours, k_new, v_new, slots)
    reference.write_kv(ref, k_new, v_new, slots)
    assert torch.equal(ours, ref)
    cos, sin = torch.randn(128, 4), torch.randn(128, 4)
    torch.testing.assert_close(
        cpu.recompute_decode_attention(q, hidden, tables, lens, wk, bk, wv, bv, 0.3, cos, sin),
        reference.recompute_decode_attention(q, hidden, tables, lens, wk, bk, wv, bv, 0.3, cos, sin))


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_heads,n_kv", [(4, 4), (6, 2)])
def test_cpu_paged_decode_buckets_equal_reference(block_size, num_heads, n_kv):
    """Spread contexts split into length buckets; the per-step cache of indices and masks is reused
    by a second call (a second layer) with other cache contents, and still matches."""
    lens = tuple(int(n) for n in torch.linspace(1, 900, 24).round().tolist())[::-1]
    q, kv, _, tables, lens_t, _, _ = _case(block_size, num_heads, n_kv, lens=lens, seed=3)
    assert len(buckets(lens_t.tolist(), block_size)) > 1
    step_cache = {}
    for layer in range(2):
        kv_layer = kv + layer
        torch.testing.assert_close(cpu.paged_decode_attention(q, kv_layer, tables, lens_t, 0.3, step_cache),
                                   reference.paged_decode_attention(q, kv_layer, tables, lens_t, 0.3))
    assert len(step_cache) == 1


def test_cpu_paged_decode_equal_lengths_and_noncontiguous_pool():
    q, kv, _, tables, lens, _, _ = _case(4, 4, 2, lens=(9, 9, 9))
    torch.testing.assert_close(cpu.paged_decode_attention(q, kv, tables, lens, 0.3),
                               reference.paged_decode_attention(q, kv, tables, lens, 0.3))
    wide = torch.zeros(*kv.shape[:-1], 2 * kv.shape[-1])
    strided = wide[..., :kv.shape[-1]]
    strided.copy_(kv)
    torch.testing.assert_close(cpu.paged_decode_attention(q, strided, tables, lens, 0.3),
                               reference.paged_decode_attention(q, kv, tables, lens, 0.3))


@pytest.mark.parametrize("kind", ["kv", "hidden"])
def test_decode_mirror_follows_the_pool_across_steps(kind):
    """Steps where a row joins, steps of growing contexts (past the headroom), a row leaving, an
    over-budget step: the mirror's attention (paged KV, or absorbed over hidden vectors) equals the
    reference on the pool at every step and layer, and a set that changes every step is not mirrored."""
    block_size, n_kv, head_dim, num_heads, d = 4, 2, 8, 4, 16
    g = torch.Generator().manual_seed(5)
    row = (2, n_kv, head_dim) if kind == "kv" else (d,)  # one token's entry: K and V, or x
    shape = (400, 2, block_size, n_kv, head_dim) if kind == "kv" else (400, block_size, d)
    pools = [torch.zeros(shape) for _ in range(2)]
    w = [torch.randn(n_kv * head_dim, d, generator=g) * 0.3 for _ in range(2)]
    b_v = torch.randn(n_kv * head_dim, generator=g)

    def write(pool, block, pos):
        value = torch.randn(row, generator=g)
        if kind == "kv":
            pool[block, :, pos] = value
        else:
            pool[block, pos] = value

    def attend(fn, pool, bt, cl, q, step_cache=None):
        extra = () if step_cache is None else (step_cache,)
        if kind == "kv":
            return fn.paged_decode_attention(q, pool, bt, cl, 0.3, *extra)
        return fn.absorbed_decode_attention(q, pool, bt, cl, w[0], w[1], b_v, 0.3, *extra)

    lens = {"a": 3, "b": 40, "c": 90}
    tables = {"a": [7], "b": list(range(20, 30)), "c": list(range(100, 123))}
    free = iter(range(200, 400))
    for p in pools:
        for rid, n in lens.items():
            for pos in range(n):
                write(p, tables[rid][pos // block_size], pos % block_size)
    mirror = DecodeMirror(num_layers=2, budget_bytes=1 << 30, planes=2 if kind == "kv" else 1)
    for step in range(100):
        if 1 <= step <= 5:  # a request joins every step: the set never holds, so nothing is mirrored
            tables[f"n{step}"], lens[f"n{step}"] = [next(free)], 2
            for p in pools:
                for pos in range(2):
                    write(p, tables[f"n{step}"][0], pos)
        if step == 50:
            del lens["b"]  # finishes: the set changes, buffers are rebuilt
        if step == 85:  # a row leaves and the rebuild is over budget: the plain gather runs
            del lens["a"]
            mirror.budget_bytes = 0
        if step == 90:  # fits again: rebuilt, although the set did not change
            mirror.budget_bytes = 1 << 30
        for rid in lens:  # the step's new token, written to the pool first (as attention layers do)
            pos = lens[rid]
            if pos // block_size == len(tables[rid]):
                tables[rid].append(next(free))
            for p in pools:
                write(p, tables[rid][pos // block_size], pos % block_size)
            lens[rid] += 1
        rids = list(lens)
        mirror.begin_step([(r, lens[r], tuple(tables[r])) for r in rids])
        width = max(len(tables[r]) for r in rids)
        bt = torch.tensor([tables[r] + [0] * (width - len(tables[r])) for r in rids])
        cl = torch.tensor([lens[r] for r in rids])
        step_cache = {f"{kind}_mirror": mirror}
        q = torch.randn(len(rids), num_heads, head_dim, generator=g)
        for p in pools:
            torch.testing.assert_close(attend(cpu, p, bt, cl, q, step_cache), attend(reference, p, bt, cl, q))
        if step == 5:
            assert mirror.epoch == 0
    assert mirror.epoch >= 5  # first step, a row left, headroom outgrown, over budget, after it


def test_a_decode_sets_run_counts_from_its_first_step():
    """How long a set holds (what a rebuild leaves room for) counts the set's own steps: steps with no
    decode rows (prefills alone) before it do not."""
    mirror = DecodeMirror(num_layers=1, budget_bytes=1 << 20)
    mirror.begin_step([("a", 5, (1, 2))])
    mirror.begin_step([("a", 6, (1, 2))])
    assert mirror.reuse and mirror.held == 1
    for _ in range(3):
        mirror.begin_step([])
    mirror.begin_step([("b", 3, (4,))])
    assert not mirror.reuse and mirror.held == 0
    assert mirror.mean_held == 0.5 * 8.0 + 0.5 * 1  # set "a" held one step
