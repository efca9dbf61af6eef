"""KV block ownership in Redis, shared by every process of a stack (the `BlockAllocator` of services).

A block's life here:
  free      its id is in the list `keys.kv_free` (LIFO: the most recently freed is granted first)
  owned     its id is in `keys.kv_owned(request_id)`, in the request's token order; prefill's blocks
            stay owned by the same request id when decode takes it over, so a hand-off moves nothing
  freed     `free(request_id)` moves all of a request's blocks back to the free list at once
  cached    (prefix caching) a full block keyed by its prefix (`services.engine.prefix_hash`) stays
            after its request: several requests' lists may hold it (counted), and one no request
            holds waits in an LRU until the free list runs out (`services.engine.blocks` has the
            whole life; the scripts are in `services.common.redis_block_scripts`)

Every change is one Lua script, so it is atomic: a block is in exactly one of those lists at any
moment, whatever number of processes allocate and free at the same time. `can_allocate` and
`num_free` are hints read outside any script; `allocate` makes the real check and either grants all
the blocks it was asked for or raises `OutOfBlocks` having changed nothing. Batched forms
(`allocate_many`, `free_many`) cost one round trip per iteration instead of one per request.

After Redis restarts (from its append-only file: nothing acknowledged is lost, and a script is
all or nothing there too) the pool is as it was; `audit` checks that invariant in one script and
puts right what can safely be put right (docs/reliability.md, "Redis restarts").

Keys (see `KeySpace`): kv_meta (hash: num_blocks, block_size) is the pool's record of existence;
an exhausted pool has no free-list key at all (Redis drops empty lists), so scripts check kv_meta.
Needs Redis >= 6.2 (LPOP with a count).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import redis

from services.common import redis_block_scripts as scripts
from services.common.contracts import KeySpace
from services.engine.blocks import CachedGrant, OutOfBlocks


class PoolNotInitialized(RuntimeError):
    """No KV pool in this Redis under this prefix (never created, deleted, or Redis lost its data)."""


class PoolMismatch(RuntimeError):
    """`init_pool` asked for a pool that differs from the one already in Redis."""


@dataclass(frozen=True, slots=True)
class PoolAudit:
    """What `RedisBlockAllocator.audit` found (and repaired)."""

    num_blocks: int
    free: int                  # on the free list after the repair
    owned: int                 # in requests' lists
    owners: int                # requests that own blocks
    returned: int              # ids that were in no list: put back on the free list
    dropped_from_free: int     # ids removed from the free list: owned too, repeated or out of range
    shared: int                # private ids in two requests' lists: not repairable, their KV may be mixed
    cached: int = 0            # keyed blocks (prefix caching), held or evictable
    evictable: int = 0         # keyed blocks no request holds (the LRU)
    cache_fixed: int = 0       # references, LRU membership or index entries put right

    @property
    def is_consistent(self) -> bool:
        return self.returned == self.dropped_from_free == self.shared == self.cache_fixed == 0


class RedisBlockAllocator:
    """`BlockAllocator` over one Redis: the free list and every request's block table."""

    def __init__(self, client: redis.Redis, keys: KeySpace) -> None:
        self._client = client
        self._keys = keys
        self._init_script = client.register_script(scripts.INIT)
        self._allocate_script = client.register_script(scripts.ALLOCATE)
        self._allocate_cached_script = client.register_script(scripts.ALLOCATE_CACHED)
        self._cache_script = client.register_script(scripts.CACHE)
        self._free_script = client.register_script(scripts.FREE)
        self._pool_keys = [keys.kv_free, keys.kv_meta, keys.kv_cache_index, keys.kv_cache_keys,
                           keys.kv_cache_refs, keys.kv_cache_lru, keys.kv_cache_clock]
        assert len(self._pool_keys) == scripts.POOL_KEYS
        self._num_blocks: int | None = None     # cached: a pool's size never changes
        self._block_size: int | None = None
        self._allocate_loaded = False           # the script is in Redis's cache (queued as a bare EVALSHA)
        self._deferred_frees: list[str] | None = None   # inside `deferring_frees`: ids freed, not yet sent
        self._deferred_keys: list[tuple[str, list[object]]] | None = None   # inside `deferring_frees`: blocks keyed

    # ------------------------------------------------------------------ pool
    def init_pool(self, num_blocks: int, block_size: int) -> int:
        """Create the pool unless it exists; returns its size. Every worker calls this at start-up.

        Raises PoolMismatch if a pool with another num_blocks or block_size is already there (a
        stale stack under the same prefix, or workers started with different settings).
        """
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be at least 1, got {num_blocks}, {block_size}")
        code, *rest = self._init_script(keys=[self._keys.kv_free, self._keys.kv_meta],
                                        args=[num_blocks, block_size])
        if code == -1:
            raise PoolMismatch(
                f"{self._keys.kv_free} holds {rest[0]} block ids but {self._keys.kv_meta} is missing: "
                f"delete the stack's keys (prefix {self._keys.prefix!r}) before starting it again")
        existing, existing_size = int(rest[0]), int(rest[1])
        if (existing, existing_size) != (num_blocks, block_size):
            raise PoolMismatch(
                f"a KV pool of {existing} blocks x {existing_size} tokens already exists under prefix "
                f"{self._keys.prefix!r}; this worker wants {num_blocks} x {block_size}. Stop the old "
                "stack (or use another key prefix) first")
        self._num_blocks, self._block_size = existing, existing_size
        return existing

    @property
    def num_blocks(self) -> int:
        if self._num_blocks is None:
            self._load_meta()
        assert self._num_blocks is not None
        return self._num_blocks

    @property
    def block_size(self) -> int:
        if self._block_size is None:
            self._load_meta()
        assert self._block_size is not None
        return self._block_size

    def _load_meta(self) -> None:
        num_blocks, block_size = self._client.hmget(self._keys.kv_meta, "num_blocks", "block_size")
        if num_blocks is None:
            raise PoolNotInitialized(f"no KV pool at {self._keys.kv_meta}: init_pool was never called")
        self._num_blocks, self._block_size = int(num_blocks), int(block_size or 0)

    def audit(self) -> PoolAudit:
        """Check that every block is in exactly one list (the free list or one request's) and repair
        what is safe (see redis_block_scripts.AUDIT), atomically. With the stack's append-only file nothing is ever
        found: every change is one script and Redis loses nothing it acknowledged; this is the check
        a worker makes after Redis came back, and the repair for a Redis that lost part of its data."""
        reply = self._client.eval(scripts.AUDIT, scripts.POOL_KEYS, *self._pool_keys,
                                  _glob_escape(self._keys.kv_owned("")) + "*")
        if reply[0] == -1:
            raise PoolNotInitialized(f"no KV pool at {self._keys.kv_meta} (Redis lost its data?)")
        return PoolAudit(*(int(v) for v in reply))

    # ------------------------------------------------------------------ reads (hints)
    @property
    def num_free(self) -> int:
        """Blocks a request can be granted: free ones and cached ones no request holds."""
        return free_count(self._client, self._keys)

    @property
    def num_cached(self) -> int:
        """Keyed blocks (prefix caching), held or evictable."""
        return int(self._client.hlen(self._keys.kv_cache_keys))

    def can_allocate(self, num_blocks: int) -> bool:
        """A hint: another process may take the blocks before `allocate` runs."""
        return num_blocks <= self.num_free

    def owned(self, request_id: str) -> list[int]:
        return [int(b) for b in self._client.lrange(self._keys.kv_owned(request_id), 0, -1)]

    def owners(self) -> list[str]:
        """Request ids that own blocks now (SCAN: not a snapshot while others allocate)."""
        prefix = self._keys.kv_owned("")
        pattern = _glob_escape(prefix) + "*"
        found = []
        for key in self._client.scan_iter(match=pattern, count=1000):
            key = key.decode() if isinstance(key, bytes) else key
            found.append(key[len(prefix):])
        return found

    # ------------------------------------------------------------------ changes (atomic)
    def allocate(self, request_id: str, num_blocks: int) -> list[int]:
        """Append `num_blocks` blocks to the request's table; all of them, or OutOfBlocks and no change."""
        _check_count(num_blocks)
        if num_blocks == 0:
            return []
        num_free, granted = self._run_allocate([(request_id, num_blocks)])
        if not granted:
            raise OutOfBlocks(f"asked for {num_blocks} blocks for {request_id}, {num_free} free")
        return granted[0]

    def allocate_many(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
        """One script call for an iteration's admissions, in order, each all or nothing.

        Stops at the first request that does not fit: it and every later one get nothing (FCFS, as
        the scheduler admits: a later, smaller request does not overtake). Granted requests are the
        keys of the result; a request id listed twice gets both grants, concatenated.
        """
        for _, n in requests:
            _check_count(n)
        if not requests:
            return {}
        result: dict[str, list[int]] = {}
        _, granted = self._run_allocate(list(requests))
        for (request_id, _), ids in zip(requests, granted):
            result.setdefault(request_id, []).extend(ids)
        return result

    def queue_allocate_many(self, pipe: redis.client.Pipeline, requests: Sequence[tuple[str, int]]) -> None:
        """`allocate_many` as one command of a pipeline (decode asks for its rows' growth in the round
        trip that reads its inputs); pass the command's reply to `granted_from`. A bare EVALSHA: redis-py's
        pipelined scripts would cost a SCRIPT EXISTS round trip every time."""
        for _, n in requests:
            _check_count(n)
        if not self._allocate_loaded:
            self._client.script_load(scripts.ALLOCATE)
            self._allocate_loaded = True
        keys = [*self._pool_keys, *(self._keys.kv_owned(r) for r, _ in requests)]
        pipe.evalsha(self._allocate_script.sha, len(keys), *keys, *(n for _, n in requests))

    def granted_from(self, reply: object, requests: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
        """What a queued `allocate_many` granted (an error it raised is raised here; a script Redis no
        longer has grants nothing, and is loaded again next time)."""
        if isinstance(reply, redis.exceptions.NoScriptError):
            self._allocate_loaded = False
            return {}
        if isinstance(reply, Exception):
            raise reply
        if reply[0] == -1:
            raise PoolNotInitialized(f"no KV pool at {self._keys.kv_meta}: init_pool was never called "
                                     "(or Redis lost its data)")
        result: dict[str, list[int]] = {}
        for (request_id, _), ids in zip(requests, reply[1:]):
            result.setdefault(request_id, []).extend(int(b) for b in ids)
        return result

    def allocate_cached(self, request_id: str, keys: Sequence[str], num_blocks: int) -> CachedGrant:
        """A new request's table: the blocks of its longest run of leading `keys` found in the cache
        (referenced, their KV reused), then fresh ones up to `num_blocks`; all, or OutOfBlocks and
        no change. The request must hold no blocks yet."""
        _check_count(num_blocks)
        reply = self._allocate_cached_script(keys=[*self._pool_keys, self._keys.kv_owned(request_id)],
                                             args=[num_blocks, *keys])
        code = int(reply[0])
        if code == -1:
            raise PoolNotInitialized(f"no KV pool at {self._keys.kv_meta}: init_pool was never called "
                                     "(or Redis lost its data)")
        if code == -2:
            raise ValueError(f"{request_id} already holds blocks: a cached grant starts a table")
        if code == -3:
            raise OutOfBlocks(f"asked for {num_blocks} blocks for {request_id} (some maybe cached), "
                              f"{int(reply[1])} free")
        return CachedGrant(code, [int(b) for b in reply[1:]])

    def cache_blocks(self, request_id: str, keyed: Sequence[tuple[int, str]]) -> int:
        """Key the request's full blocks (table position, key) once their KV is written; how many
        became reusable."""
        if not keyed:
            return 0
        args = [v for index, key in keyed for v in (index, key)]
        if self._deferred_keys is not None:
            self._deferred_keys.append((request_id, args))
            return 0
        return int(self._cache_script(keys=[self._keys.kv_cache_index, self._keys.kv_cache_keys,
                                            self._keys.kv_cache_refs, self._keys.kv_owned(request_id)],
                                      args=args))

    def reset_cache(self) -> int:
        """Forget every cached block no request holds (their blocks go to the free list), as vLLM's
        reset_prefix_cache; -> how many. Blocks requests hold keep their keys."""
        reply = self._client.eval(scripts.RESET_CACHE, scripts.POOL_KEYS, *self._pool_keys)
        if int(reply[0]) == -1:
            raise PoolNotInitialized(f"no KV pool at {self._keys.kv_meta}")
        return int(reply[0])

    def free(self, request_id: str) -> int:
        """Return all of the request's blocks; how many came back (0 if it owned none: idempotent)."""
        return self.free_many((request_id,))

    def free_many(self, request_ids: Iterable[str]) -> int:
        """`free` for several requests in one script call; total blocks returned (0 while deferring)."""
        if self._deferred_frees is not None:
            self._deferred_frees.extend(request_ids)
            return 0
        owned_keys = [self._keys.kv_owned(r) for r in request_ids]
        if not owned_keys:
            return 0
        return int(self._free_script(keys=[*self._pool_keys, *owned_keys]))

    @contextlib.contextmanager
    def deferring_frees(self) -> Iterator[list[str]]:
        """Within the block, `free` and `free_many` only note the request ids, in the list yielded,
        and `cache_blocks` the blocks to key, for the caller to send with `queue_deferred` in a
        pipeline it sends anyway (the worker's publish: no round trip of their own): the keys first,
        then the frees. Only for ids that cannot be allocated again before that pipeline is sent (a
        finished request; not a preempted one that prefill recomputes). Keys noted and never sent
        (the pipeline failed) are dropped by the next block: a key is only ever written for KV that
        is in place."""
        deferred: list[str] = []
        self._deferred_frees, self._deferred_keys = deferred, []
        try:
            yield deferred
        finally:
            self._deferred_frees = None

    def queue_deferred(self, pipe: redis.client.Pipeline, request_ids: Sequence[str]) -> None:
        """What the last `deferring_frees` block noted, as commands of `pipe`: the blocks to key
        (EVAL, as queue_free_many), then the frees of `request_ids` (the ids it yielded)."""
        keyed, self._deferred_keys = self._deferred_keys or [], None
        for request_id, args in keyed:
            pipe.eval(scripts.CACHE, 4, self._keys.kv_cache_index, self._keys.kv_cache_keys,
                      self._keys.kv_cache_refs, self._keys.kv_owned(request_id), *args)
        self.queue_free_many(pipe, request_ids)

    def queue_free_many(self, pipe: redis.client.Pipeline, request_ids: Sequence[str]) -> None:
        """`free_many` as one command of a pipeline (EVAL with the script's text: a pipeline sent
        after Redis restarted finds no cached script, and this one needs no reply)."""
        if request_ids:
            owned_keys = [self._keys.kv_owned(r) for r in request_ids]
            pipe.eval(scripts.FREE, scripts.POOL_KEYS + len(owned_keys), *self._pool_keys, *owned_keys)

    def _run_allocate(self, requests: list[tuple[str, int]]) -> tuple[int, list[list[int]]]:
        """(free blocks left, the grants in order: fewer than asked when one did not fit)."""
        keys = [*self._pool_keys, *(self._keys.kv_owned(r) for r, _ in requests)]
        reply = self._allocate_script(keys=keys, args=[n for _, n in requests])
        if reply[0] == -1:
            raise PoolNotInitialized(f"no KV pool at {self._keys.kv_meta}: init_pool was never called "
                                     "(or Redis lost its data)")
        return int(reply[0]), [[int(b) for b in ids] for ids in reply[1:]]


def queue_free_count(pipe: redis.client.Pipeline, keys: KeySpace) -> None:
    """Queue what makes the pool's free count on `pipe`: its last two replies, summed by
    `free_count_from` (free blocks, and cached ones no request holds, which are granted as free)."""
    pipe.llen(keys.kv_free)
    pipe.zcard(keys.kv_cache_lru)


def free_count_from(replies: Sequence[object]) -> int:
    """The free count from the last two replies of a pipeline `queue_free_count` ended."""
    return int(replies[-2]) + int(replies[-1])


def queue_cached_run(pipe: redis.client.Pipeline, keys: KeySpace, block_keys: Sequence[str]) -> None:
    """Queue the lookup of a prompt's reusable block keys (`prefix_hash.reusable_keys`) in the cache
    index: one HMGET; `cached_run_from` its reply. A hint, as `num_free`: an admission may find more
    (a block keyed meanwhile) or fewer (one evicted meanwhile)."""
    pipe.hmget(keys.kv_cache_index, list(block_keys))


def cached_run_from(reply: Sequence[object]) -> int:
    """How many of the keys a queued `queue_cached_run` looked up are cached from the first on: the
    blocks an admission now would reuse (it stops at the first key not found, as ALLOCATE_CACHED)."""
    run = 0
    for block in reply:
        if block is None:
            break
        run += 1
    return run


def queue_cache_size(pipe: redis.client.Pipeline, keys: KeySpace) -> None:
    """Queue the count of keyed blocks (held by requests or evictable): one HLEN."""
    pipe.hlen(keys.kv_cache_keys)


def free_count(client: redis.Redis, keys: KeySpace) -> int:
    """The pool's free count in one round trip: what a request can be granted now."""
    pipe = client.pipeline(transaction=False)
    queue_free_count(pipe, keys)
    return free_count_from(pipe.execute())


def _check_count(num_blocks: int) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"block count must be a non-negative int, got {num_blocks!r}")


def _glob_escape(text: str) -> str:
    """Escape SCAN MATCH's special characters so a prefix matches itself only."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
