"""Prefix caching in both block allocators (in-process BlockManager, Redis): reuse by key, references,
eviction, and a randomized run against a reference model that checks no block is ever handed out or
overwritten while a request still holds it."""
from __future__ import annotations

import multiprocessing
import random

import pytest
import redis

from services.common.contracts import KeySpace
from services.common.redis_blocks import RedisBlockAllocator
from services.engine.blocks import BlockManager, OutOfBlocks
from services.engine.prefix_hash import block_keys, reusable_keys

BLOCK = 4


@pytest.fixture(params=["memory", "redis"])
def make_blocks(request):
    def make(num_blocks: int):
        if request.param == "memory":
            return BlockManager(num_blocks)
        client = request.getfixturevalue("redis_client")
        blocks = RedisBlockAllocator(client, request.getfixturevalue("keys"))
        blocks.init_pool(num_blocks, BLOCK)
        return blocks
    return make


def test_keys_are_chained_and_only_for_full_blocks():
    a = block_keys(list(range(10)), BLOCK)
    assert len(a) == 2 and len(set(a)) == 2
    assert block_keys([0, 1, 2, 3, 9, 9, 9, 9], BLOCK)[0] == a[0]          # same first block
    assert block_keys([0, 1, 2, 3, 9, 9, 9, 9], BLOCK)[1] != a[1]          # another second block
    assert block_keys([5, 5, 5, 5, 4, 5, 6, 7], BLOCK)[1] != a[1]          # same tokens, other parent
    assert block_keys(list(range(8)), BLOCK, salt="tenant") != block_keys(list(range(8)), BLOCK)
    assert block_keys(list(range(12)), BLOCK, parent=a[1], start_block=2) == block_keys(list(range(12)), BLOCK)[2:]
    assert len(reusable_keys(list(range(8)), BLOCK)) == 1                  # the last token is always computed
    assert len(reusable_keys(list(range(9)), BLOCK)) == 2


def test_a_cached_prefix_is_reused_and_kept_after_its_requests_end(make_blocks):
    blocks = make_blocks(8)
    keys = block_keys(list(range(12)), BLOCK)
    first = blocks.allocate_cached("a", keys, 4)
    assert first.num_cached == 0 and len(first.block_ids) == 4
    assert blocks.cache_blocks("a", list(enumerate(keys))) == 3
    second = blocks.allocate_cached("b", keys[:2], 3)                    # shares two blocks with a
    assert second.num_cached == 2 and second.block_ids[:2] == first.block_ids[:2]
    assert blocks.num_free == 8 - 4 - 1
    blocks.free("a")
    assert blocks.num_free == 8 - 3                                       # a's third keyed block: evictable
    blocks.free("b")
    assert blocks.num_free == 8 and blocks.num_cached == 3
    third = blocks.allocate_cached("c", keys, 3)
    assert third.num_cached == 3 and third.block_ids == first.block_ids[:3]


def test_eviction_takes_the_least_recently_released_and_never_a_held_block(make_blocks):
    blocks = make_blocks(4)
    keys = block_keys(list(range(16)), BLOCK)
    grant = blocks.allocate_cached("a", keys, 4)
    blocks.cache_blocks("a", list(enumerate(keys)))
    held = blocks.allocate_cached("b", keys[:1], 1)                       # b holds block 0 of the prefix
    blocks.free("a")                                                      # 3 evictable, tail released first
    assert blocks.num_free == 3
    assert sorted(blocks.allocate("c", 1)) == [grant.block_ids[3]]        # the tail goes first
    assert blocks.allocate_cached("d", keys, 4 - 1).num_cached == 3       # the other three are still cached
    with pytest.raises(OutOfBlocks):
        blocks.allocate_cached("e", keys, 4)                              # the fourth key is gone, no block free
    blocks.free("c")                                                      # the evicted block, private now
    assert blocks.allocate_cached("e", keys, 4).num_cached == 3
    with pytest.raises(OutOfBlocks):
        blocks.allocate("f", 1)                                           # every block is held
    assert blocks.owned("b") == held.block_ids


def test_a_cached_grant_that_does_not_fit_changes_nothing(make_blocks):
    blocks = make_blocks(4)
    keys = block_keys(list(range(8)), BLOCK)
    blocks.allocate_cached("a", keys, 2)
    blocks.cache_blocks("a", list(enumerate(keys)))
    blocks.free("a")
    with pytest.raises(OutOfBlocks):
        blocks.allocate_cached("b", keys, 5)
    assert blocks.num_free == 4 and blocks.num_cached == 2 and blocks.owned("b") == []
    blocks.allocate("c", 1)
    with pytest.raises(ValueError):
        blocks.allocate_cached("c", keys, 2)                              # only a new table


def test_a_key_already_cached_is_not_taken_by_a_second_block(make_blocks):
    blocks = make_blocks(8)
    keys = block_keys(list(range(8)), BLOCK)
    a = blocks.allocate_cached("a", keys, 2)
    b = blocks.allocate_cached("b", keys, 2)                              # computed at the same time: no hit
    assert b.num_cached == 0
    assert blocks.cache_blocks("a", list(enumerate(keys))) == 2
    assert blocks.cache_blocks("b", list(enumerate(keys))) == 0           # b's copies stay private
    blocks.free("b")
    assert blocks.num_free == 6
    assert blocks.allocate_cached("c", keys, 2).block_ids == a.block_ids


class Reference:
    """What the pool must look like from the outside: each request's table and what its KV holds.
    Every block's content is tracked; a block handed out while held would be overwritten."""

    def __init__(self) -> None:
        self.content: dict[int, str] = {}          # block -> what was written into it
        self.tables: dict[str, list[tuple[int, str]]] = {}   # request -> (block, what it must hold)

    def check(self, blocks) -> None:
        for request_id, table in self.tables.items():
            assert blocks.owned(request_id) == [b for b, _ in table]
            for block, want in table:
                assert self.content[block] == want, f"{request_id}'s block {block} was overwritten"
        held = {b for table in self.tables.values() for b, _ in table}
        assert blocks.num_free == blocks.num_blocks - len(held)


def churn(blocks, seed: int, steps: int, prefix: str = "") -> None:
    rng = random.Random(seed)
    ref = Reference()
    stems = [[rng.randrange(50) for _ in range(6 * BLOCK)] for _ in range(3)]
    for step in range(steps):
        op = rng.random()
        if op < 0.5 or not ref.tables:
            request_id = f"{prefix}r{step}"
            prompt = rng.choice(stems)[:rng.randrange(1, 6 * BLOCK)] + [rng.randrange(50) for _ in range(rng.randrange(3))]
            keys = reusable_keys(prompt, BLOCK)
            need = -(-(len(prompt) + 1) // BLOCK)
            try:
                grant = blocks.allocate_cached(request_id, keys, need)
            except OutOfBlocks:
                continue
            wants = [keys[i] if i < len(keys) else f"{request_id}:{i}" for i in range(need)]
            for i, block in enumerate(grant.block_ids):
                if i < grant.num_cached:
                    assert ref.content[block] == keys[i]                   # a hit holds that prefix's KV
                else:
                    ref.content[block] = wants[i]                          # prefill writes it
            ref.tables[request_id] = list(zip(grant.block_ids, wants))
            blocks.cache_blocks(request_id, [(i, keys[i]) for i in range(grant.num_cached, len(keys))])
        elif op < 0.65:
            request_id = rng.choice(sorted(ref.tables))
            try:
                (block,) = blocks.allocate(request_id, 1)                  # decode grows it
            except OutOfBlocks:
                continue
            ref.content[block] = f"{request_id}:grow{step}"
            ref.tables[request_id].append((block, ref.content[block]))
        else:
            request_id = rng.choice(sorted(ref.tables))
            blocks.free(request_id)
            del ref.tables[request_id]
        ref.check(blocks)


@pytest.mark.parametrize("seed", range(3))
def test_randomized_against_the_reference_model(make_blocks, seed):
    blocks = make_blocks(12)
    churn(blocks, seed, 400)
    if isinstance(blocks, RedisBlockAllocator):
        audit = blocks.audit()
        assert audit.is_consistent, audit


def _churn_process(url: str, prefix: str, seed: int) -> None:
    client = redis.Redis.from_url(url)
    keys = KeySpace(prefix)
    blocks = RedisBlockAllocator(client, keys)
    rng = random.Random(seed)
    stems = [[rng.randrange(50) for _ in range(6 * BLOCK)] for _ in range(2)]
    for step in range(300):
        request_id = f"p{seed}-{step}"
        prompt = stems[step % 2][:rng.randrange(BLOCK, 6 * BLOCK)]
        keys_ = reusable_keys(prompt, BLOCK)
        try:
            grant = blocks.allocate_cached(request_id, keys_, len(keys_) + 1)
        except OutOfBlocks:
            continue
        blocks.cache_blocks(request_id, [(i, k) for i, k in enumerate(keys_)])
        if rng.random() < 0.8:
            blocks.free(request_id)
        assert len(set(grant.block_ids)) == len(grant.block_ids)


def test_concurrent_processes_share_and_release_consistently(redis_server, redis_client, keys):
    blocks = RedisBlockAllocator(redis_client, keys)
    blocks.init_pool(32, BLOCK)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_churn_process, args=(redis_server.url, keys.prefix, seed)) for seed in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for owner in blocks.owners():
        blocks.free(owner)
    audit = blocks.audit()
    assert audit.is_consistent, audit
    assert blocks.num_free == 32 and audit.free + audit.evictable == 32


def test_the_audit_puts_cached_blocks_right(redis_client, keys):
    blocks = RedisBlockAllocator(redis_client, keys)
    blocks.init_pool(8, BLOCK)
    prefix_keys = block_keys(list(range(12)), BLOCK)
    a = blocks.allocate_cached("a", prefix_keys, 3)
    blocks.cache_blocks("a", list(enumerate(prefix_keys)))
    blocks.allocate_cached("b", prefix_keys, 2)
    assert blocks.audit().is_consistent
    redis_client.hset(keys.kv_cache_refs, a.block_ids[0], 7)                 # wrong count
    redis_client.zadd(keys.kv_cache_lru, {a.block_ids[1]: 1})                # held, yet evictable
    redis_client.hset(keys.kv_cache_index, "stale", 5)                       # points at a private block
    audit = blocks.audit()
    assert audit.cache_fixed == 3 and not audit.is_consistent
    assert blocks.audit().is_consistent
    blocks.free("a")
    blocks.free("b")
    assert blocks.num_free == 8 and blocks.audit().evictable == 3


def test_keys_noted_in_a_deferring_block_go_out_before_the_frees(redis_client, keys):
    blocks = RedisBlockAllocator(redis_client, keys)
    blocks.init_pool(8, BLOCK)
    prefix_keys = block_keys(list(range(12)), BLOCK)
    blocks.allocate_cached("a", prefix_keys, 3)
    with blocks.deferring_frees() as finished:
        assert blocks.cache_blocks("a", list(enumerate(prefix_keys))) == 0     # noted, not sent
        blocks.free("a")
    assert blocks.num_cached == 0 and finished == ["a"]
    pipe = redis_client.pipeline(transaction=True)
    blocks.queue_deferred(pipe, finished)
    pipe.execute()
    assert blocks.num_cached == 3 and blocks.num_free == 8                    # keyed, then released: evictable
    assert blocks.allocate_cached("b", prefix_keys, 3).num_cached == 3
    with blocks.deferring_frees():
        blocks.cache_blocks("b", [(0, "stale")])                              # its pipeline never sent
    with blocks.deferring_frees() as finished:
        pass
    pipe = redis_client.pipeline(transaction=True)
    blocks.queue_deferred(pipe, finished)
    pipe.execute()
    assert redis_client.hget(keys.kv_cache_index, "stale") is None


def test_reset_cache_forgets_what_no_request_holds(redis_client, keys):
    blocks = RedisBlockAllocator(redis_client, keys)
    blocks.init_pool(8, BLOCK)
    prefix_keys = block_keys(list(range(12)), BLOCK)
    blocks.allocate_cached("a", prefix_keys, 3)
    blocks.cache_blocks("a", list(enumerate(prefix_keys)))
    blocks.allocate_cached("b", prefix_keys, 1)                               # holds the first block
    blocks.free("a")
    assert blocks.reset_cache() == 2 and blocks.num_cached == 1 and blocks.num_free == 7
    assert blocks.allocate_cached("c", prefix_keys, 3).num_cached == 1
    assert blocks.audit().is_consistent
