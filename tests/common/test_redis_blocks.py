"""RedisBlockAllocator against a real redis-server: atomic, all or nothing, never a block twice."""
from __future__ import annotations

import multiprocessing
import random
import threading

import pytest
import redis

from services.common.contracts import KeySpace
from services.common.redis_blocks import PoolMismatch, PoolNotInitialized, RedisBlockAllocator
from services.engine.blocks import BlockManager, OutOfBlocks
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerMode
from services.engine.sequence import Sequence

# Every block id of the pool, from the free list and every owned list, read in one atomic step.
SNAPSHOT = """
local all = redis.call('LRANGE', KEYS[1], 0, -1)
for _, key in ipairs(redis.call('KEYS', ARGV[1])) do
  for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do all[#all + 1] = id end
end
return all
"""


def make_allocator(client: redis.Redis, keys: KeySpace, num_blocks: int = 8) -> RedisBlockAllocator:
    blocks = RedisBlockAllocator(client, keys)
    blocks.init_pool(num_blocks, 16)
    return blocks


def all_block_ids(client: redis.Redis, keys: KeySpace) -> list[int]:
    return sorted(int(b) for b in client.eval(SNAPSHOT, 1, keys.kv_free, keys.kv_owned("*")))


def test_init_pool_is_idempotent_and_refuses_another_size(redis_client, keys):
    blocks = RedisBlockAllocator(redis_client, keys)
    assert blocks.init_pool(8, 16) == 8
    assert blocks.allocate("a", 3) == [0, 1, 2]
    assert RedisBlockAllocator(redis_client, keys).init_pool(8, 16) == 8     # a second worker
    assert blocks.num_free == 5 and blocks.owned("a") == [0, 1, 2]           # nothing was reset
    with pytest.raises(PoolMismatch, match="8 blocks x 16 tokens"):
        RedisBlockAllocator(redis_client, keys).init_pool(9, 16)
    with pytest.raises(PoolMismatch):
        RedisBlockAllocator(redis_client, keys).init_pool(8, 32)
    late = RedisBlockAllocator(redis_client, keys)                           # never called init_pool
    assert (late.num_blocks, late.block_size) == (8, 16)


def test_without_a_pool_is_a_clear_error(redis_client, keys):
    blocks = RedisBlockAllocator(redis_client, keys)
    with pytest.raises(PoolNotInitialized):
        blocks.allocate("a", 1)
    with pytest.raises(PoolNotInitialized):
        _ = blocks.num_blocks
    with pytest.raises(ValueError):
        blocks.init_pool(0, 16)


def test_allocate_appends_in_order_and_free_returns_everything(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 8)
    assert blocks.allocate("a", 2) == [0, 1]
    assert blocks.allocate("a", 1) == [2]
    assert blocks.allocate("b", 0) == [] and "b" not in blocks.owners()
    assert blocks.owned("a") == [0, 1, 2] and blocks.num_free == 5
    assert blocks.free("a") == 3 and blocks.num_free == 8 and blocks.owned("a") == []
    assert blocks.free("a") == 0 and blocks.free("never-seen") == 0        # idempotent
    assert blocks.allocate("c", 3) == [0, 1, 2]                           # recently freed first
    assert all_block_ids(redis_client, keys) == list(range(8))
    with pytest.raises(ValueError):
        blocks.allocate("a", -1)


def test_allocate_is_all_or_nothing(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 8)
    blocks.allocate("a", 5)
    assert blocks.can_allocate(3) and not blocks.can_allocate(4)
    with pytest.raises(OutOfBlocks, match="asked for 4 blocks for b, 3 free"):
        blocks.allocate("b", 4)
    assert blocks.num_free == 3 and blocks.owned("b") == [] and blocks.owners() == ["a"]


def test_allocate_many_grants_in_order_until_one_does_not_fit(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 8)
    assert blocks.allocate_many([]) == {}
    granted = blocks.allocate_many([("a", 2), ("b", 3), ("a", 1), ("c", 4), ("d", 1)])
    assert granted == {"a": [0, 1, 5], "b": [2, 3, 4]}    # c does not fit; d would, but waits behind it
    assert blocks.owned("a") == [0, 1, 5] and blocks.owned("c") == [] and blocks.owned("d") == []
    assert blocks.num_free == 2


def test_allocate_many_queued_in_a_pipeline_grants_the_same(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 8)
    asks = [("a", 2), ("b", 3), ("c", 4)]
    pipe = redis_client.pipeline(transaction=False)
    pipe.llen(keys.kv_free)
    blocks.queue_allocate_many(pipe, asks)
    replies = pipe.execute(raise_on_error=False)
    assert blocks.granted_from(replies[-1], asks) == {"a": [0, 1], "b": [2, 3, 4]}
    assert blocks.owned("b") == [2, 3, 4] and blocks.num_free == 3
    redis_client.script_flush()                               # Redis restarted: grants nothing, loads again
    pipe = redis_client.pipeline(transaction=False)
    blocks.queue_allocate_many(pipe, asks)
    assert blocks.granted_from(pipe.execute(raise_on_error=False)[-1], asks) == {}
    pipe = redis_client.pipeline(transaction=False)
    blocks.queue_allocate_many(pipe, [("c", 1)])
    assert blocks.granted_from(pipe.execute(raise_on_error=False)[-1], [("c", 1)]) == {"c": [5]}
    redis_client.delete(keys.kv_meta)
    pipe = redis_client.pipeline(transaction=False)
    blocks.queue_allocate_many(pipe, [("d", 1)])
    with pytest.raises(PoolNotInitialized):
        blocks.granted_from(pipe.execute(raise_on_error=False)[-1], [("d", 1)])


def test_free_many_is_one_call_and_idempotent(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 8)
    blocks.allocate_many([("a", 2), ("b", 3), ("c", 1)])
    assert blocks.free_many(["a", "b", "a", "zzz"]) == 5
    assert blocks.free_many(["a", "b"]) == 0 and blocks.free_many([]) == 0
    assert sorted(blocks.owners()) == ["c"] and blocks.num_free == 7
    assert all_block_ids(redis_client, keys) == list(range(8))


def test_frees_deferred_in_a_block_go_out_with_a_pipeline(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 8)
    blocks.allocate_many([("a", 2), ("b", 3)])
    with blocks.deferring_frees() as deferred:
        assert blocks.free("a") == 0 and blocks.free_many(["b"]) == 0
    assert deferred == ["a", "b"] and blocks.num_free == 3          # noted, nothing sent yet
    blocks.allocate("c", 1)                                         # outside the block: at once again
    pipe = redis_client.pipeline(transaction=False)
    blocks.queue_free_many(pipe, deferred)
    blocks.queue_free_many(pipe, [])                                # nothing queued for no ids
    assert pipe.execute() == [5]
    assert sorted(blocks.owners()) == ["c"] and blocks.num_free == 7
    redis_client.script_flush()                                     # as after a Redis restart: EVAL, no cache needed
    pipe = redis_client.pipeline(transaction=False)
    blocks.queue_free_many(pipe, ["c"])
    assert pipe.execute() == [1] and all_block_ids(redis_client, keys) == list(range(8))


def test_owners_are_per_prefix_even_with_glob_characters(redis_client):
    a = make_allocator(redis_client, KeySpace("glob[a]*"), 4)
    b = make_allocator(redis_client, KeySpace("globa-x"), 4)
    a.allocate("r1", 1)
    b.allocate("r2", 1)
    assert a.owners() == ["r1"] and b.owners() == ["r2"]


def test_large_pool_and_large_grants(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 20_000)       # more ids than Lua's unpack takes at once
    got = blocks.allocate("big", 9_000)
    assert got == list(range(9_000)) and blocks.num_free == 11_000
    assert blocks.free("big") == 9_000 and blocks.allocate("next", 2) == [0, 1]


def test_free_after_the_pool_was_deleted_does_not_resurrect_a_free_list(redis_client, keys):
    blocks = make_allocator(redis_client, keys, 4)
    blocks.allocate("a", 4)                    # the free list is now empty, so no key
    redis_client.delete(keys.kv_meta)          # e.g. `duoserve down` removing the stack's keys
    assert blocks.free("a") == 4
    assert not redis_client.exists(keys.kv_free)
    assert RedisBlockAllocator(redis_client, keys).init_pool(4, 16) == 4   # a clean start works


def test_scheduler_sees_the_same_blocks_as_with_the_in_process_manager(redis_client, keys):
    """The Redis allocator is a drop-in BlockAllocator: same batches, same block ids, preemptions too."""
    def run(blocks) -> list:
        sched = Scheduler(SchedulerConfig(mode=SchedulerMode.HYBRID, block_size=4, eos_token_ids=(0,)), blocks)
        for i in range(5):
            sched.add(Sequence(f"r{i}", list(range(1, 10 + i)), SamplingParams(max_tokens=12)))
        trace = []
        while sched.has_work():
            out = sched.schedule()
            trace.append([(c.request_id, c.block_ids) for c in out.chunks] + [out.preempted_ids])
            sched.postprocess(out, {c.request_id: 7 for c in out.chunks if c.is_sampled})
        return trace

    expected = run(BlockManager(12))
    assert any(step[-1] for step in expected)             # the pool is small enough to preempt
    assert run(make_allocator(redis_client, keys, 12)) == expected
    assert all_block_ids(redis_client, keys) == list(range(12))
    assert redis_client.llen(keys.kv_free) == 12


# ------------------------------------------------------------------ concurrency

NUM_BLOCKS = 48
SHARED_IDS = [f"shared{i}" for i in range(4)]     # allocated and freed by every process


def churn(url: str, prefix: str, seed: int, num_ops: int, client: redis.Redis | None = None) -> None:
    """Random allocate/free traffic; checks what only this process can know (its private requests)."""
    rng = random.Random(seed)
    blocks = RedisBlockAllocator(client or redis.Redis.from_url(url), KeySpace(prefix))
    assert blocks.init_pool(NUM_BLOCKS, 16) == NUM_BLOCKS        # every process races to create it
    mine: dict[str, list[int]] = {f"p{seed}-{i}": [] for i in range(4)}
    for _ in range(num_ops):
        request_id = rng.choice(list(mine) + SHARED_IDS)
        op = rng.random()
        if op < 0.35:
            try:
                got = blocks.allocate(request_id, rng.randint(1, 8))
            except OutOfBlocks:
                continue
            if request_id in mine:
                mine[request_id].extend(got)
        elif op < 0.5:
            wanted = [(rng.choice(list(mine) + SHARED_IDS), rng.randint(1, 6)) for _ in range(3)]
            for rid, got in blocks.allocate_many(wanted).items():
                if rid in mine:
                    mine[rid].extend(got)
        elif op < 0.75:
            returned = blocks.free(request_id)
            if request_id in mine:
                assert returned == len(mine[request_id])
                mine[request_id].clear()
        elif op < 0.85:
            ids = rng.sample(list(mine) + SHARED_IDS, 3)
            blocks.free_many(ids)
            for rid in ids:
                mine.get(rid, []).clear()
        else:
            assert blocks.owned(request_id) == mine[request_id] if request_id in mine else True
            assert 0 <= blocks.num_free <= NUM_BLOCKS


def test_concurrent_processes_never_lose_or_duplicate_a_block(redis_server, redis_client, keys):
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=churn, args=(redis_server.url, keys.prefix, seed, 500)) for seed in range(4)]
    for w in workers:
        w.start()
    snapshots = 0
    while any(w.is_alive() for w in workers):       # the invariant holds at every instant, not only at the end
        ids = all_block_ids(redis_client, keys)
        if ids:                                    # empty until the first process created the pool
            assert ids == list(range(NUM_BLOCKS)), "a block was lost or duplicated mid-run"
            snapshots += 1
    for w in workers:
        w.join()
        assert w.exitcode == 0
    assert snapshots > 0
    assert all_block_ids(redis_client, keys) == list(range(NUM_BLOCKS))
    blocks = RedisBlockAllocator(redis_client, keys)
    assert blocks.num_free + sum(len(blocks.owned(r)) for r in blocks.owners()) == NUM_BLOCKS


def test_concurrent_threads_share_one_client(redis_server, redis_client, keys):
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            churn(redis_server.url, keys.prefix, seed, 300, client=redis_client)
        except BaseException as e:     # a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(100 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all_block_ids(redis_client, keys) == list(range(NUM_BLOCKS))


def test_the_audit_finds_a_consistent_pool_after_any_allocations(redis_client, keys):
    blocks = make_allocator(redis_client, keys, num_blocks=64)
    rng = random.Random(3)
    for i in range(40):
        blocks.allocate_many([(f"r{i}", rng.randint(0, 3)), (f"r{rng.randint(0, i)}", 1)])
        if rng.random() < 0.4:
            blocks.free(f"r{rng.randint(0, i)}")
    before = all_block_ids(redis_client, keys)
    audit = blocks.audit()
    assert audit.is_consistent and audit.num_blocks == 64
    assert audit.free + audit.owned == 64 and audit.free == blocks.num_free
    assert audit.owners == len(blocks.owners())
    assert all_block_ids(redis_client, keys) == before == list(range(64))


def test_the_audit_repairs_what_is_safe_and_counts_what_is_not(redis_client, keys):
    blocks = make_allocator(redis_client, keys, num_blocks=16)
    a, b = blocks.allocate("a", 2), blocks.allocate("b", 2)
    redis_client.lrem(keys.kv_free, 0, 15)              # block 15 in no list: leaked
    redis_client.lpush(keys.kv_free, a[0], 99)          # owned and free; out of range
    redis_client.rpush(keys.kv_free, 10)                # free twice
    redis_client.rpush(keys.kv_owned("b"), a[1])        # in two requests' lists
    audit = blocks.audit()
    assert (audit.returned, audit.dropped_from_free, audit.shared) == (1, 3, 1)
    assert not audit.is_consistent
    free = [int(x) for x in redis_client.lrange(keys.kv_free, 0, -1)]
    assert sorted(free) == sorted(set(range(16)) - set(a) - set(b)) and len(free) == audit.free == 12
    assert blocks.audit().returned == blocks.audit().dropped_from_free == 0    # repaired; the shared one stays


def test_the_audit_without_a_pool_raises(redis_client, keys):
    with pytest.raises(PoolNotInitialized):
        RedisBlockAllocator(redis_client, keys).audit()
