"""KV block accounting: which request owns which blocks of the paged pool, and which full blocks are
kept for reuse by key (prefix caching).

Pure Python. `BlockAllocator` is the contract every owner of block state implements: the in-process
`BlockManager` here (offline engine, colocated mode, simulator, tests) and the Redis-backed allocator
of the service stack, where ownership must be shared between processes. Callers check before they
act: `can_allocate` never changes state, `allocate` either grants all blocks or raises.

A block's life, with prefix caching (as vLLM's automatic prefix caching, nano-vllm's block manager):
  free       on the free list: no request holds it, nothing reusable in it
  private    in one request's table, not keyed (being filled, or its key is held by another block)
  cached     keyed (`services.engine.prefix_hash`): its KV is that of one exact prefix; held by one or
             more requests' tables (its reference count) or by none: then it is evictable, and kept
             until the free list runs out, least recently released first
  reused     `allocate_cached` finds a new request's leading keys and puts those blocks first in its
             table (reference +1, no KV written again); the rest of the table is fresh blocks
  evicted    a fresh block is wanted and the free list is empty: the least recently released
             evictable block loses its key and is granted as a fresh one
Freeing a request releases its references: private blocks go to the free list, cached ones become
evictable when no request holds them any more. A block is never handed out while referenced.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence


class OutOfBlocks(RuntimeError):
    """`allocate` was called for more blocks than are free; callers should have asked first."""


@dataclass(frozen=True, slots=True)
class CachedGrant:
    """What `allocate_cached` gave a request with no blocks yet."""

    num_cached: int              # leading blocks found by key: their KV is written, prefill skips them
    block_ids: list[int]         # the request's whole table now, in token order (cached ones first)


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
    # Prefix caching. `keys`: the request's reusable block keys in order (prefix_hash.reusable_keys);
    # the longest run of leading keys found is reused, `num_blocks` is the whole table wanted.
    def allocate_cached(self, request_id: str, keys: Sequence[str], num_blocks: int) -> CachedGrant: ...
    # Key the request's full blocks (index in its table, key) once their KV is written: -> how many
    # became reusable (a block already keyed, or a key another block holds, is left as it is).
    def cache_blocks(self, request_id: str, keyed: Sequence[tuple[int, str]]) -> int: ...


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """In-process `BlockAllocator`: a free list (LIFO, so recently freed blocks are reused warm) and
    the cached blocks' keys, references and eviction order."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self._num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._key_of: dict[int, str] = {}            # cached block -> its key
        self._block_of: dict[str, int] = {}          # key -> the one block that holds it
        self._refs: dict[int, int] = {}              # cached block -> tables that hold it
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached, held by none; oldest first

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks a request can be granted: free ones and cached ones no request holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks with a key (held or evictable)."""
        return len(self._key_of)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def cached_run(self, keys: Sequence[str]) -> int:
        """How many of `keys`, from the first on, are cached now: the blocks `allocate_cached` would
        reuse (the orchestrator's view of a waiting prompt in the simulator)."""
        run = 0
        for key in keys:
            if key not in self._block_of:
                break
            run += 1
        return run

    def allocate(self, request_id: str, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free:
            raise OutOfBlocks(f"asked for {num_blocks} blocks, {self.num_free} free")
        granted = self._take(num_blocks)
        self._tables.setdefault(request_id, []).extend(granted)
        return granted

    def allocate_many(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
        granted: dict[str, list[int]] = {}
        for request_id, num_blocks in requests:
            if num_blocks > self.num_free:
                break
            granted.setdefault(request_id, []).extend(self.allocate(request_id, num_blocks))
        return granted

    def allocate_cached(self, request_id: str, keys: Sequence[str], num_blocks: int) -> CachedGrant:
        if self._tables.get(request_id):
            raise ValueError(f"{request_id} already holds blocks: a cached grant starts a table")
        hits: list[int] = []
        for key in keys[:num_blocks]:
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
        fresh = num_blocks - len(hits)
        reclaimed = sum(1 for b in hits if b in self._evictable)   # held again: no longer evictable
        if fresh > self.num_free - reclaimed:
            raise OutOfBlocks(f"asked for {fresh} fresh blocks (+{len(hits)} cached), {self.num_free - reclaimed} free")
        for block in hits:
            self._refs[block] += 1
            self._evictable.pop(block, None)
        table = hits + self._take(fresh)
        self._tables[request_id] = table
        return CachedGrant(len(hits), list(table))

    def cache_blocks(self, request_id: str, keyed: Sequence[tuple[int, str]]) -> int:
        table = self._tables.get(request_id, [])
        added = 0
        for index, key in keyed:
            if not 0 <= index < len(table):
                continue
            block = table[index]
            if block in self._key_of or key in self._block_of:
                continue
            self._key_of[block], self._block_of[key], self._refs[block] = key, block, 1
            added += 1
        return added

    def free(self, request_id: str) -> int:
        table = self._tables.pop(request_id, [])
        for block in reversed(table):                # the tail is released first: evicted first
            if block in self._key_of:
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    self._evictable[block] = None
            else:
                self._free.append(block)
        return len(table)

    def owned(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def owners(self) -> Sequence[str]:
        return tuple(self._tables)

    def _take(self, num_blocks: int) -> list[int]:
        """Fresh blocks: the free list first, then the least recently released evictable ones."""
        granted = []
        for _ in range(num_blocks):
            if self._free:
                granted.append(self._free.pop())
                continue
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)], self._refs[block]
            granted.append(block)
        return granted
