"""The CPU fast paths equal the torch references (ragged contexts, partial blocks, MHA and GQA)."""
from __future__ import annotations

import pytest
import torch

from aptray_kernels import cpu, reference


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
