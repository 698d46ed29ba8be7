"""The one KV cache: a static, preallocated buffer per layer, written in place.

Static shapes keep decode steps capturable in CUDA graphs and exportable; the caller tracks positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at positions [start, start+T); return the cache's first start+T positions."""
        B, T = k.size(0), k.size(2)
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {start + T}")
        self.k[:B, :, start:start + T] = k.to(self.k.dtype)
        self.v[:B, :, start:start + T] = v.to(self.v.dtype)
        return self.k[:B, :, :start + T], self.v[:B, :, :start + T]
