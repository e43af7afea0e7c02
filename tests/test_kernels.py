"""Triton kernels == torch references, run on CPU tensors through the Triton interpreter.

triton is a declared test dependency (extra "kernels"): if it is missing these tests fail, they never skip.
Triton decides interpreter vs compiler when a function is decorated, and its own standard library
(tl.sum, tl.max) is decorated when triton is first imported. So TRITON_INTERPRET=1 must be set before the
first `import triton` in the process. If triton was already imported in compiled mode (e.g. aptray_kernels.ops
on a CUDA machine, or another test), this file reruns itself in a fresh process with the variable set.
"""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest
import torch

from aptray_kernels import ops, reference
from aptray_kernels.random_inputs import attention_weights, paged_rows, poison_unfilled, rotary_tables


def _triton_loaded_in_compiled_mode() -> bool:
    if "triton" not in sys.modules:
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction
    return not isinstance(standard.max, InterpretedFunction)


RERUN_IN_SUBPROCESS = _triton_loaded_in_compiled_mode()


def _import_interpreted():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("aptray_kernels.triton_ops")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous


# An ImportError here fails the module: no silent skip without triton.
triton_ops = None if RERUN_IN_SUBPROCESS else _import_interpreted()


@pytest.fixture(autouse=True)
def _interpret_mode(monkeypatch):
    # The interpreter also reads TRITON_INTERPRET when it launches a kernel, so keep it set during each test.
    monkeypatch.setenv("TRITON_INTERPRET", "1")


torch.set_num_threads(1)
BLOCK_SIZES = [1, 4, 16]
# (query heads, kv heads): MHA, GQA, MQA
HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]
# Ragged rows: a single token, partially filled last blocks, one row long enough for several tiles.
CONTEXT_LENS = [1, 7, 21, 70]


def _close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.language import standard
    assert isinstance(sys.modules["aptray_kernels.triton_cache"]._write_kv_kernel, InterpretedFunction)
    assert isinstance(standard.max, InterpretedFunction)


def test_kernel_names_and_signatures_match_the_references():
    assert set(triton_ops.KERNELS) == {"write_kv", "write_hidden", "gather_hidden", "paged_decode_attention",
                                       "absorbed_decode_attention", "recompute_decode_attention"}
    for name, fn in triton_ops.KERNELS.items():
        ref_params = list(inspect.signature(getattr(reference, name)).parameters)
        assert list(inspect.signature(fn).parameters)[:len(ref_params)] == ref_params, name
        assert hasattr(ops, name)


def test_cpu_dispatch_never_uses_triton():
    from aptray_kernels import cpu

    assert ops._pick("paged_decode_attention", torch.zeros(1)) is cpu.paged_decode_attention
    assert ops._pick("write_hidden", torch.zeros(1)) is reference.write_hidden


def test_import_without_triton_falls_back_to_references():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import aptray_kernels.ops as ops\n"
            "assert ops._TRITON == {}\n"
            "try:\n    import aptray_kernels.triton_ops\nexcept ImportError:\n    print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("n_kv", [1, 3])
def test_write_kv(block_size, n_kv):
    gen = torch.Generator().manual_seed(block_size * 10 + n_kv)
    num_blocks, tokens, head_dim = 6, 11, 8
    cache = torch.randn(num_blocks, 2, block_size, n_kv, head_dim, generator=gen)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:min(tokens, num_blocks * block_size)]
    k = torch.randn(len(slots), n_kv, head_dim, generator=gen)
    v = torch.randn(len(slots), n_kv, head_dim, generator=gen)
    reference.write_kv(expected, k, v, slots)
    triton_ops.write_kv(cache, k, v, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_write_hidden(block_size):
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, width = 5, 40
    cache = torch.randn(num_blocks, block_size, width, generator=gen)
    expected = cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:9]
    x = torch.randn(len(slots), width, generator=gen)
    reference.write_hidden(expected, x, slots)
    triton_ops.write_hidden(cache, x, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gather_hidden(block_size):
    gen = torch.Generator().manual_seed(block_size)
    tables, num_blocks, lens = paged_rows(block_size, CONTEXT_LENS, gen=gen)
    cache = torch.randn(num_blocks, block_size, 24, generator=gen)
    max_len = int(lens.max())
    assert torch.equal(triton_ops.gather_hidden(cache, tables, max_len),
                       reference.gather_hidden(cache, tables, max_len))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_paged_decode_attention(block_size, heads, num_splits):
    num_heads, n_kv = heads
    gen = torch.Generator().manual_seed(block_size * 100 + n_kv)
    head_dim = 16
    tables, num_blocks, lens = paged_rows(block_size, CONTEXT_LENS, gen=gen)
    cache = torch.randn(num_blocks, 2, block_size, n_kv, head_dim, generator=gen)
    poison_unfilled(cache, tables, lens, block_size)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    ref = reference.paged_decode_attention(q, cache, tables, lens, 0.25)
    assert torch.isfinite(ref).all()
    _close(triton_ops.paged_decode_attention(q, cache, tables, lens, 0.25, num_splits=num_splits), ref)


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of `watched`'s values back to the host (on a GPU, each is a device sync)."""
    READS = (torch.Tensor.max, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__index__)

    def __init__(self, watched: torch.Tensor):
        super().__init__()
        self.watched, self.reads = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and args and args[0] is self.watched:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_decode_kernels_take_the_longest_context_from_the_host():
    """With max_len given, no decode wrapper reads context_lens back (a device sync per layer on a GPU,
    which stops the host from queueing the next layer's kernels); without it, each reads it once."""
    gen = torch.Generator().manual_seed(5)
    head_dim, width, n_kv, num_heads = 8, 40, 2, 4
    tables, num_blocks, lens = paged_rows(4, CONTEXT_LENS, gen=gen)
    kv = torch.randn(num_blocks, 2, 4, n_kv, head_dim, generator=gen)
    hidden = torch.randn(num_blocks, 4, width, generator=gen)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    w_k, b_k, w_v, b_v = attention_weights(n_kv, head_dim, width, True, gen)
    calls = {
        "paged": lambda **kw: triton_ops.paged_decode_attention(q, kv, tables, lens, 0.3, **kw),
        "absorbed": lambda **kw: triton_ops.absorbed_decode_attention(q, hidden, tables, lens, w_k, w_v, b_v, 0.3,
                                                                      **kw),
        "recompute": lambda **kw: triton_ops.recompute_decode_attention(q, hidden, tables, lens, w_k, b_k, w_v, b_v,
                                                                        0.3, **kw)}
    for name, call in calls.items():
        with HostReads(lens) as reads:
            given = call(max_len=max(CONTEXT_LENS))
        assert reads.reads == [], (name, reads.reads)
        with HostReads(lens) as reads:
            read_back = call()
        assert reads.reads, name  # the detector sees the read the default makes
        _close(given, read_back)


@pytest.mark.parametrize("tiling", [(16, 32, 4), (64, 16, 8), (8, 64, None)])
def test_absorbed_decode_attention_under_every_tiling(tiling):
    """The GPU check times tilings of the two passes against the default: each must compute the same."""
    from aptray_kernels.triton_absorbed import Tiling
    gen = torch.Generator().manual_seed(11)
    head_dim, width, n_kv, num_heads = 8, 40, 2, 4
    tables, num_blocks, lens = paged_rows(4, CONTEXT_LENS, gen=gen)
    cache = torch.randn(num_blocks, 4, width, generator=gen)
    poison_unfilled(cache, tables, lens, 4)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    w_k, _, w_v, b_v = attention_weights(n_kv, head_dim, width, True, gen)
    _close(triton_ops.absorbed_decode_attention(q, cache, tables, lens, w_k, w_v, b_v, 0.3, tiling=Tiling(*tiling)),
           reference.absorbed_decode_attention(q, cache, tables, lens, w_k, w_v, b_v, 0.3))


def test_paged_decode_attention_odd_head_dim():
    gen = torch.Generator().manual_seed(7)
    tables, num_blocks, lens = paged_rows(4, [3, 9], gen=gen)
    cache = torch.randn(num_blocks, 2, 4, 2, 12, generator=gen)
    q = torch.randn(2, 6, 12, generator=gen)
    _close(triton_ops.paged_decode_attention(q, cache, tables, lens, 0.3),
           reference.paged_decode_attention(q, cache, tables, lens, 0.3))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_LAYOUTS[:2])
@pytest.mark.parametrize("bias,num_splits", [(True, None), (False, 2)])
def test_absorbed_decode_attention(block_size, heads, bias, num_splits):
    num_heads, n_kv = heads
    gen = torch.Generator().manual_seed(block_size * 100 + n_kv)
    head_dim, width = 8, 40  # width is not a multiple of the d chunk: exercises the masks
    tables, num_blocks, lens = paged_rows(block_size, CONTEXT_LENS, gen=gen)
    cache = torch.randn(num_blocks, block_size, width, generator=gen)
    poison_unfilled(cache, tables, lens, block_size)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    w_k, _, w_v, b_v = attention_weights(n_kv, head_dim, width, bias, gen)
    ref = reference.absorbed_decode_attention(q, cache, tables, lens, w_k, w_v, b_v, 0.3)
    assert torch.isfinite(ref).all()
    _close(triton_ops.absorbed_decode_attention(q, cache, tables, lens, w_k, w_v, b_v, 0.3, num_splits=num_splits),
           ref)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEAD_LAYOUTS[:2])
@pytest.mark.parametrize("rotary,bias", [(True, True), (False, False)])
def test_recompute_decode_attention(block_size, heads, rotary, bias):
    num_heads, n_kv = heads
    gen = torch.Generator().manual_seed(block_size * 100 + n_kv)
    head_dim, width = 16, 40
    tables, num_blocks, lens = paged_rows(block_size, CONTEXT_LENS, gen=gen)
    cache = torch.randn(num_blocks, block_size, width, generator=gen)
    poison_unfilled(cache, tables, lens, block_size)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    w_k, b_k, w_v, b_v = attention_weights(n_kv, head_dim, width, bias, gen)
    cos, sin = rotary_tables(128, head_dim) if rotary else (None, None)
    ref = reference.recompute_decode_attention(q, cache, tables, lens, w_k, b_k, w_v, b_v, 0.25, cos, sin)
    assert torch.isfinite(ref).all()
    _close(triton_ops.recompute_decode_attention(q, cache, tables, lens, w_k, b_k, w_v, b_v, 0.25, cos, sin), ref)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("rotary", [True, False])
def test_gather_project_kv_equals_reference_projection(block_size, rotary):
    gen = torch.Generator().manual_seed(block_size)
    n_kv, head_dim, width = 2, 8, 24
    tables, num_blocks, lens = paged_rows(block_size, [5, 33], gen=gen)
    cache = torch.randn(num_blocks, block_size, width, generator=gen)
    w_k, b_k, w_v, b_v = attention_weights(n_kv, head_dim, width, True, gen)
    cos, sin = rotary_tables(64, head_dim) if rotary else (None, None)
    max_len = int(lens.max())
    ref_k, ref_v = reference.project_kv(reference.gather_hidden(cache, tables, max_len), w_k, b_k, w_v, b_v,
                                        n_kv, head_dim, cos, sin)
    k, v = triton_ops.gather_project_kv(cache, tables, max_len, w_k, b_k, w_v, b_v, n_kv, head_dim, cos, sin)
    _close(k, ref_k)
    _close(v, ref_v)


def test_absorbed_equals_recompute_and_kv_paths():
    """The three decode paths agree on one random OPT-like layer (no rotary): hidden -> KV is exact."""
    gen = torch.Generator().manual_seed(3)
    num_heads, head_dim, width, block_size = 4, 8, 32, 4
    lens = [6, 19]
    tables, num_blocks, context_lens = paged_rows(block_size, lens, gen=gen)
    hidden = torch.randn(num_blocks, block_size, width, generator=gen)
    w_k, b_k, w_v, b_v = attention_weights(num_heads, head_dim, width, True, gen)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    max_len = max(lens)
    k, v = triton_ops.gather_project_kv(hidden, tables, max_len, w_k, b_k, w_v, b_v, num_heads, head_dim)
    kv_cache = torch.zeros(num_blocks, 2, block_size, num_heads, head_dim)
    for row, length in enumerate(lens):
        slots = tables[row, torch.arange(length) // block_size] * block_size + torch.arange(length) % block_size
        triton_ops.write_kv(kv_cache, k[row, :length], v[row, :length], slots)
    kv_out = triton_ops.paged_decode_attention(q, kv_cache, tables, context_lens, 0.3)
    absorbed = triton_ops.absorbed_decode_attention(q, hidden, tables, context_lens, w_k, w_v, b_v, 0.3)
    recompute = triton_ops.recompute_decode_attention(q, hidden, tables, context_lens, w_k, b_k, w_v, b_v, 0.3)
    _close(absorbed, kv_out)
    _close(recompute, kv_out)


if RERUN_IN_SUBPROCESS:
    # Drop the in-process tests (they cannot run here) and run the whole file in a fresh interpreted process.
    for _name in [name for name in globals() if name.startswith("test_")]:
        del globals()[_name]

    def test_kernels_in_a_fresh_interpreted_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
