"""Tensor-parallel state: rank and world size of the torch.distributed group (1 when not initialised)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_world() > 1:
        dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's x, concatenated along dim in rank order."""
    world = tp_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    return all_gather(x, -1)


def split(size: int, what: str) -> int:
    world = tp_world()
    if size % world:
        raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size ({world})")
    return size // world
