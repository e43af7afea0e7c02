"""The d-sharded hidden cache (TP=2 over gloo, two real processes) equals the unsharded references."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aptray_kernels import reference

N, H, N_KV, D, BLOCK, LENS = 3, 4, 4, 8, 4, (1, 7, 13)  # MHA, ragged contexts, partial last blocks


def _problem():
    g = torch.Generator().manual_seed(0)
    d = H * D
    blocks_per_row = -(-max(LENS) // BLOCK)
    hidden = torch.randn(N * blocks_per_row + 1, BLOCK, d, generator=g)
    hidden[0] = float("nan")  # a block nobody owns: must never leak into outputs
    tables = torch.arange(1, N * blocks_per_row + 1).view(N, blocks_per_row)
    lens = torch.tensor(LENS)
    flat = hidden.view(-1, d)
    for row, n in enumerate(LENS):  # poison the unfilled tail of each row's last block
        last = int(tables[row, (n - 1) // BLOCK])
        flat[last * BLOCK + (n - 1) % BLOCK + 1:(last + 1) * BLOCK] = float("nan")
    w = {name: torch.randn(N_KV * D, d, generator=g) * 0.1 for name in ("wk", "wv")}
    b = {name: torch.randn(N_KV * D, generator=g) for name in ("bk", "bv")}
    q = torch.randn(N, H, D, generator=g)
    rope = torch.randn(2, 32, D // 2, generator=g)
    return q, hidden, tables, lens, w, b, rope


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from aptray.model.sharded_hidden import d_slice, sharded_absorbed_decode_attention, sharded_project_kv
        q, hidden, tables, lens, w, b, rope = _problem()
        cols = d_slice(H * D)
        heads = slice(rank * H // world, (rank + 1) * H // world)
        rows = slice(rank * N_KV * D // world, (rank + 1) * N_KV * D // world)
        my_hidden = hidden[..., cols].contiguous()
        absorbed = sharded_absorbed_decode_attention(q[:, heads], my_hidden, tables, lens, w["wk"][:, cols],
                                                     w["wv"][:, cols], b["bv"][rows], D ** -0.5)
        x = reference.gather_hidden(my_hidden, tables[2:3], LENS[2])[0]
        k, v = sharded_project_kv(x, w["wk"][:, cols], b["bk"][rows], w["wv"][:, cols], b["bv"][rows], D, *rope)
        torch.save({"absorbed": absorbed, "k": k, "v": v},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_sharded_hidden_equals_unsharded_reference(tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    q, hidden, tables, lens, w, b, rope = _problem()

    want = reference.absorbed_decode_attention(q, hidden, tables, lens, w["wk"], w["wv"], b["bv"], D ** -0.5)
    got = torch.cat([p["absorbed"] for p in parts], dim=1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # ... and absorbed is exact attention: equal to attention over projected K/V (the key bias cancels)
    x = reference.gather_hidden(hidden, tables, int(lens.max()))
    k, v = reference.project_kv(x, w["wk"], b["bk"], w["wv"], b["bv"], N_KV, D)
    kv_cache = torch.stack((k, v), dim=2).reshape(-1, 2, 1, N_KV, D)  # one token per block
    table = torch.arange(N * int(lens.max())).view(N, -1)
    torch.testing.assert_close(got, reference.paged_decode_attention(q, kv_cache, table, lens, D ** -0.5),
                               atol=1e-4, rtol=1e-4)

    x = reference.gather_hidden(hidden, tables[2:3], LENS[2])[0]
    k, v = reference.project_kv(x, w["wk"], b["bk"], w["wv"], b["bv"], N_KV, D, *rope)
    for name, full in (("k", k), ("v", v)):
        torch.testing.assert_close(torch.cat([p[name] for p in parts], dim=-2), full, atol=1e-5, rtol=1e-5)
