"""Rotary position embedding (neox style, as Llama), with cos/sin tables for every position."""
from __future__ import annotations

import torch
from torch import nn

from aptray_kernels import ops


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, rope_scaling: dict | None = None):
        super().__init__()
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {rope_scaling} is not supported yet")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return ops.apply_rotary(x, positions, self.cos, self.sin)

    def step_cos_sin(self, positions: torch.Tensor, dtype, scratch: dict):
        """cos/sin rows [T, 1, D/2] of one step's positions, taken once and reused by every layer."""
        key = ("rope", id(self), dtype)
        if key not in scratch:
            scratch[key] = (self.cos[positions].unsqueeze(-2).to(dtype), self.sin[positions].unsqueeze(-2).to(dtype))
        return scratch[key]
