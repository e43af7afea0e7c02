"""Tiny random-weight test models, made once per test process (removed at its exit), and transformers
references."""
from __future__ import annotations

import functools

import torch

from aptray.model import hf_reference
from aptray.model.factory import make_tiny_model
from loadgen.scratch import scratch_dir

SHAPES = {
    # name: (arch, hidden, layers, heads, kv heads)
    "opt-60x3": ("opt", 60, 2, 3, None),
    "opt-40x5": ("opt", 40, 3, 5, None),
    "opt-64x4": ("opt", 64, 2, 4, None),
    "llama-48x3": ("llama", 48, 2, 3, 3),
    "llama-96x3": ("llama", 96, 3, 3, 3),
    "llama-gqa-64x4x2": ("llama", 64, 2, 4, 2),
}
_ROOT = scratch_dir("aptray-tiny-")


@functools.lru_cache(maxsize=None)
def tiny_model(name: str) -> str:
    arch, hidden, layers, heads, kv = SHAPES[name]
    return make_tiny_model(f"{_ROOT}/{name}", arch, hidden_size=hidden, num_layers=layers, num_heads=heads,
                           num_kv_heads=kv, max_positions=256)


@functools.lru_cache(maxsize=None)
def hf_model(path: str):
    return hf_reference.load_hf_model(path)


@functools.lru_cache(maxsize=None)
def hf_greedy(path: str, prompt: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    """transformers generate, greedy, EOS ignored (as the engine's ignore_eos)."""
    return hf_reference.hf_greedy(hf_model(path), prompt, max_new_tokens)


def hf_last_logits(path: str, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(torch.tensor([token_ids])).logits[0, -1].float()


def prompts(num: int, seed: int, vocab: int = 500, lo: int = 3, hi: int = 40) -> list[list[int]]:
    """Prompts of different lengths, mostly not multiples of any block size."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (num,), generator=g).tolist()
    return [[3] + torch.randint(4, vocab, (n - 1,), generator=g).tolist() for n in lengths]
