"""The attention-backend entry points aptray's engine calls: Triton on CUDA, batched torch on CPU
(aptray_kernels.cpu), the torch reference elsewhere."""
from __future__ import annotations

import logging

from . import cpu, reference

logger = logging.getLogger(__name__)

# Triton implementations register themselves here (name -> callable) when triton and CUDA are present.
_TRITON: dict = {}


def _register_triton() -> None:
    """Fill _TRITON on CUDA machines; anywhere else (or if triton is broken) the references serve every call."""
    try:
        import torch
        if not torch.cuda.is_available():
            return
        from . import triton_ops
    except Exception as exc:  # missing or broken triton must never break importing aptray_kernels
        logger.warning("aptray_kernels: Triton kernels unavailable, using torch references (%s)", exc)
        return
    _TRITON.update(triton_ops.KERNELS)


_register_triton()


def _pick(name: str, tensor):
    if tensor.is_cuda and name in _TRITON:
        return _TRITON[name]
    if tensor.device.type == "cpu" and name in cpu.KERNELS:
        return cpu.KERNELS[name]
    return getattr(reference, name)


def write_kv(kv_cache, k, v, slots):
    return _pick("write_kv", kv_cache)(kv_cache, k, v, slots)


def write_hidden(hidden_cache, x, slots):
    return _pick("write_hidden", hidden_cache)(hidden_cache, x, slots)


def gather_hidden(hidden_cache, block_tables, max_len):
    return _pick("gather_hidden", hidden_cache)(hidden_cache, block_tables, max_len)


def _decode(name: str, q, args: tuple, step_cache=None, max_len: int | None = None):
    """The backend's decode attention. step_cache: a dict that lives for one engine step; the CPU path
    keeps per-step index tensors and masks there so that every layer reuses them. max_len: the longest
    context, known on the host; the Triton path takes it instead of reading context_lens.max() back
    from the GPU, a sync per layer that stops the host from queueing the next layer's kernels."""
    fn = _pick(name, q)
    if fn is cpu.KERNELS.get(name):
        return fn(q, *args, step_cache)
    if fn is _TRITON.get(name):
        return fn(q, *args, max_len=max_len)
    return fn(q, *args)


def paged_decode_attention(q, kv_cache, block_tables, context_lens, scale, step_cache=None, max_len=None):
    return _decode("paged_decode_attention", q, (kv_cache, block_tables, context_lens, scale), step_cache, max_len)


def absorbed_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, w_v, b_v, scale, step_cache=None,
                              max_len=None):
    return _decode("absorbed_decode_attention", q, (hidden_cache, block_tables, context_lens, w_k, w_v, b_v, scale),
                   step_cache, max_len)


def recompute_decode_attention(q, hidden_cache, block_tables, context_lens, w_k, b_k, w_v, b_v, scale,
                               cos=None, sin=None, max_len=None):
    fn = _pick("recompute_decode_attention", q)
    args = (q, hidden_cache, block_tables, context_lens, w_k, b_k, w_v, b_v, scale, cos, sin)
    return fn(*args, max_len=max_len) if fn is _TRITON.get("recompute_decode_attention") else fn(*args)


gather_kv = reference.gather_kv
apply_rotary = reference.apply_rotary
rotate = reference.rotate
project_kv = reference.project_kv
