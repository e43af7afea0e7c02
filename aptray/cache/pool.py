"""The physical cache: one tensor per layer, viewed as KV blocks or as hidden blocks."""
from __future__ import annotations

import torch


class CachePool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 hidden_size: int, hidden_block_size: int, dtype: torch.dtype, device):
        self.block_elems = 2 * block_size * num_kv_heads * head_dim
        if hidden_block_size * hidden_size > self.block_elems:
            raise ValueError("a hidden block must fit in a KV block")
        self.storage = [torch.zeros(num_blocks, self.block_elems, dtype=dtype, device=device)
                        for _ in range(num_layers)]
        self.kv = [s.view(num_blocks, 2, block_size, num_kv_heads, head_dim) for s in self.storage]
        # a hidden block is a prefix of the same storage: B/r tokens of d elements
        self.hidden = [s[:, :hidden_block_size * hidden_size].view(num_blocks, hidden_block_size, hidden_size)
                       for s in self.storage]

    def layers(self):
        return list(zip(self.kv, self.hidden))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
