"""Torch reference implementations of aptray's cache and attention ops.

These are the CPU backend and the ground truth the Triton kernels are tested against.

Cache layout, per layer (both views share one storage, see aptray.cache.pool):
  kv_cache:     [num_blocks, 2, B, n_kv, D]   (index 0 = K, 1 = V)
  hidden_cache: [num_blocks, Bh, d]           (Bh = hidden tokens per physical block)
A slot is block_id * block_tokens + offset. block_tables are int64 [N, max_blocks], padded with 0;
context_lens are int64 [N] and count the tokens already written, the current one included.
"""
from __future__ import annotations

import torch


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store k, v [T, n_kv, D] at slots [T]."""
    block_size = kv_cache.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = v.to(kv_cache.dtype)


def write_hidden(hidden_cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Store hidden vectors x [T, d] at slots [T]."""
    block_size = hidden_cache.shape[1]
    hidden_cache[slots // block_size, slots % block_size] = x.to(hidden_cache.dtype)


def _context_mask(context_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=context_lens.device)[None, :] < context_lens[:, None]


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int):
    """K, V [N, max_len, n_kv, D] for each row's blocks (positions past its length are garbage)."""
    n, _ = block_tables.shape
    _, _, block_size, n_kv, head_dim = kv_cache.shape
    blocks = kv_cache[block_tables]  # [N, max_blocks, 2, B, n_kv, D]
    k = blocks[:, :, 0].reshape(n, -1, n_kv, head_dim)[:, :max_len]
    v = blocks[:, :, 1].reshape(n, -1, n_kv, head_dim)[:, :max_len]
    return k, v


def gather_hidden(hidden_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Hidden vectors [N, max_len, d] for each row's blocks (positions past its length are garbage)."""
    n = block_tables.shape[0]
    return hidden_cache[block_tables].reshape(n, -1, hidden_cache.shape[-1])[:, :max_len]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotary (rotate halves) on x [..., T, heads, D] at positions [..., T]; cos/sin [max_pos, D/2]."""
    return rotate(x, cos[positions].unsqueeze(-2).to(x.dtype), sin[positions].unsqueeze(-2).to(x.dtype))


def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """apply_rotary with the cos/sin rows of x's positions already taken: c, s [..., T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [N, H, D], k/v [N, L, n_kv, D], mask [N, L] -> [N, H, D], in fp32."""
    n, num_heads, head_dim = q.shape
    n_kv = k.shape[2]
    qg = q.float().view(n, n_kv, num_heads // n_kv, head_dim)
    scores = torch.einsum("ngqd,nlgd->ngql", qg, k.float()) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Zero V past each row's length: unfilled cache slots may hold NaN/Inf bits, and 0 * NaN = NaN.
    v = v.float().masked_fill(~mask[:, :, None, None], 0.0)
    out = torch.einsum("ngql,nlgd->ngqd", probs, v)
    return out.reshape(n, num_heads, head_dim).to(q.dtype)


def paged_decode_attention(q, kv_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per row: q [N, H, D] over its paged K/V -> [N, H, D]. GQA by H // n_kv."""
    max_len = int(context_lens.max())
    k, v = gather_kv(kv_cache, block_tables, max_len)
    return _attend(q, k, v, _context_mask(context_lens, max_len), scale)


def absorbed_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, w_v, b_v, scale: float):
    """Decode attention straight from the hidden cache, for models without rotary positions.

    score_t = q_h . (W_k,h x_t + b_k,h) = (W_k,h^T q_h) . x_t + const: the key bias cancels in softmax.
    out_h = W_v,h (sum_t a_t x_t) + b_v,h because the weights a_t sum to one.
    q [N, H, D]; w_k, w_v [n_kv * D, d] (this rank's rows); b_v [n_kv * D] or None.
    """
    n, num_heads, head_dim = q.shape
    d = hidden_cache.shape[-1]
    n_kv = w_k.shape[0] // head_dim
    group = num_heads // n_kv
    max_len = int(context_lens.max())
    mask = _context_mask(context_lens, max_len)
    # Zero x past each row's length: unfilled cache slots may hold NaN/Inf bits, and 0 * NaN = NaN.
    x = gather_hidden(hidden_cache, block_tables, max_len).float().masked_fill(~mask[:, :, None], 0.0)
    wk = w_k.float().view(n_kv, head_dim, d)
    wv = w_v.float().view(n_kv, head_dim, d)
    qg = q.float().view(n, n_kv, group, head_dim)
    u = torch.einsum("ngqe,ged->ngqd", qg, wk)  # W_k,h^T q_h: [N, n_kv, group, d]
    scores = torch.einsum("ngqd,nld->ngql", u, x) * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    y = torch.einsum("ngql,nld->ngqd", probs, x)  # weighted sum of hidden vectors
    out = torch.einsum("ngqd,ged->ngqe", y, wv)
    if b_v is not None:
        out = out + b_v.float().view(1, n_kv, 1, head_dim)
    return out.reshape(n, num_heads, head_dim).to(q.dtype)


def recompute_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, b_k, w_v, b_v, scale: float,
                               cos=None, sin=None):
    """Decode attention that re-projects K and V from the hidden cache (any model; rotary if cos/sin given).

    q [N, H, D] (already rotated); w_k, w_v [n_kv * D, d]; b_k, b_v [n_kv * D] or None.
    """
    n, num_heads, head_dim = q.shape
    n_kv = w_k.shape[0] // head_dim
    max_len = int(context_lens.max())
    x = gather_hidden(hidden_cache, block_tables, max_len)
    k, v = project_kv(x, w_k, b_k, w_v, b_v, n_kv, head_dim, cos, sin)
    return _attend(q, k, v, _context_mask(context_lens, max_len), scale)


def project_kv(x, w_k, b_k, w_v, b_v, n_kv: int, head_dim: int, cos=None, sin=None):
    """K, V [..., L, n_kv, D] from hidden vectors x [..., L, d] at positions 0..L-1 (hidden -> KV)."""
    k = torch.nn.functional.linear(x, w_k, b_k).unflatten(-1, (n_kv, head_dim))
    v = torch.nn.functional.linear(x, w_v, b_v).unflatten(-1, (n_kv, head_dim))
    if cos is not None:
        positions = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1])
        k = apply_rotary(k, positions, cos, sin)
    return k, v
