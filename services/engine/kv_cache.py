"""The paged KV pool: its shape, its size from a memory budget, and views over memory owned elsewhere.

One tensor [num_layers, 2, num_blocks, Hkv, block_size, D]: block b holds K and V of every layer,
so one block id means the same tokens in every layer. Inside a block the layout is head-major
(see `attention.py`: gathering blocks then yields attention's [Hkv, L, D] operand without a transpose). The engine never allocates it itself when
it runs inside a worker: the arena owns the memory and each worker views it (`view_kv_pool`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.model_config import ModelConfig


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Everything needed to lay out (or map) the KV pool."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def for_model(cls, config: ModelConfig, block_size: int, dtype: torch.dtype,
                  num_blocks: int | None = None, memory_bytes: int | None = None) -> "KVCacheSpec":
        """Size the pool by block count, or by a memory budget when no count is given."""
        spec = cls(config.num_layers, 1, block_size, config.num_kv_heads, config.head_dim, dtype)
        if num_blocks is None:
            if memory_bytes is None:
                raise ValueError("give num_blocks or memory_bytes")
            num_blocks = memory_bytes // spec.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"KV memory budget too small for one block of {spec.bytes_per_block} bytes")
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype)


def allocate_kv_pool(spec: KVCacheSpec, device: str | torch.device = "cpu") -> torch.Tensor:
    """A private pool (offline engine, colocated mode)."""
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)


def view_kv_pool(buffer: torch.Tensor, spec: KVCacheSpec) -> torch.Tensor:
    """The pool over memory someone else owns (a shared-memory segment mapped as a flat uint8 tensor)."""
    if buffer.numel() * buffer.element_size() < spec.num_bytes:
        raise ValueError(f"KV buffer has {buffer.numel() * buffer.element_size()} bytes, pool needs {spec.num_bytes}")
    flat = buffer.view(torch.uint8)[: spec.num_bytes].view(spec.dtype)
    return flat.view(spec.shape)
