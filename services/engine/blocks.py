"""KV block accounting: which request owns which blocks of the paged pool.

Pure Python. `BlockAllocator` is the contract every owner of block state implements: the in-process
`BlockManager` here (offline engine, colocated mode, tests) and the Redis-backed allocator of the
service stack, where ownership must be shared between processes. Callers check before they act:
`can_allocate` never changes state, `allocate` either grants all blocks or raises.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class OutOfBlocks(RuntimeError):
    """`allocate` was called for more blocks than are free; callers should have asked first."""


class BlockAllocator(Protocol):
    """Owner of the free list and of each request's blocks."""

    @property
    def num_blocks(self) -> int: ...          # size of the pool
    @property
    def num_free(self) -> int: ...            # blocks not owned by any request

    def can_allocate(self, num_blocks: int) -> bool: ...
    def allocate(self, request_id: str, num_blocks: int) -> list[int]: ...   # appended to the request's table
    # Several requests in one call, in order, each all or nothing, stopping at the first that does
    # not fit: the granted ones are the keys of the result (one round trip for an iteration's growth).
    def allocate_many(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[int]]: ...
    def free(self, request_id: str) -> int: ...                              # returns how many came back
    def owned(self, request_id: str) -> list[int]: ...                       # the request's blocks, in order


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """In-process `BlockAllocator`: a free list (LIFO, so recently freed blocks are reused warm)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self._num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, request_id: str, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocks(f"asked for {num_blocks} blocks, {len(self._free)} free")
        granted = [self._free.pop() for _ in range(num_blocks)]
        self._tables.setdefault(request_id, []).extend(granted)
        return granted

    def allocate_many(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
        granted: dict[str, list[int]] = {}
        for request_id, num_blocks in requests:
            if num_blocks > len(self._free):
                break
            granted.setdefault(request_id, []).extend(self.allocate(request_id, num_blocks))
        return granted

    def free(self, request_id: str) -> int:
        table = self._tables.pop(request_id, [])
        self._free.extend(reversed(table))
        return len(table)

    def owned(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def owners(self) -> Sequence[str]:
        return tuple(self._tables)
