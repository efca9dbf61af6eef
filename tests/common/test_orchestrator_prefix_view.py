"""The orchestrator's view of the prefix cache, against a real redis-server: each waiting prompt's
cached tokens from the pool's index (keyed with the salt the admitting worker reports), bounded, in
one pipelined HMGET per prompt; the pool's cached blocks; and the queue state the policy is given."""
from __future__ import annotations

import time

from orchestrator.controller import Controller
from orchestrator.prefix_view import PromptKeys
from orchestrator.redis_state import RedisState, Waiting
from services.common import stream_entries
from services.common.contracts import QueuedRequest, WorkerReport
from services.common.redis_blocks import RedisBlockAllocator
from services.engine.blocks import blocks_for_tokens
from services.engine.prefix_hash import block_keys
from services.engine.sampling_params import SamplingParams

BLOCK = 16
SALT = "arena-memory-1"
PARAMS = SamplingParams(max_tokens=8)
HISTORY = [1000 + i for i in range(100)]          # 6 full blocks and 4 tokens


def _pool(client, keys, num_blocks: int = 64) -> RedisBlockAllocator:
    blocks = RedisBlockAllocator(client, keys)
    blocks.init_pool(num_blocks, BLOCK)
    return blocks


def _served(blocks: RedisBlockAllocator, tokens: list[int], salt: str = SALT, request_id: str = "done") -> None:
    """A request that ran and finished as the scheduler runs one: its table, its full blocks keyed, freed
    (the keyed blocks stay cached, evictable)."""
    keys = block_keys(tokens, BLOCK, salt)
    blocks.allocate_cached(request_id, keys, blocks_for_tokens(len(tokens) + 1, BLOCK))
    blocks.cache_blocks(request_id, list(enumerate(keys)))
    blocks.free(request_id)


def _report(client, keys, phase: str = "prefill", caching: bool = True, salt: str = SALT) -> None:
    report = WorkerReport(phase, f"{phase}-1", "127.0.0.1:1", 0.5, (), 2048, 0, 0, 1, 64, 64, time.time(),
                          prefix_caching=caching, cache_salt=salt)
    client.hset(keys.worker_stats(phase), mapping=stream_entries.report_mapping(report))


def _queue(client, keys, request_id: str, prompt: list[int], output: list[int] = (), arrival: float = 1.7e9) -> None:
    request = QueuedRequest(request_id, tuple(prompt), PARAMS, "duo:reply:g1", arrival, tuple(output))
    stream_entries.add(client, stream_entries.queued(keys, request))


def _hmgets(client) -> int:
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_waiting_prompts_carry_their_cached_prefix_and_the_policy_gets_it(redis_client, keys):
    _served(_pool(redis_client, keys), HISTORY)
    _report(redis_client, keys)
    _queue(redis_client, keys, "next-turn", HISTORY + list(range(40)))          # the history, resent
    _queue(redis_client, keys, "other", list(range(5000, 5100)))                # nothing in common
    _queue(redis_client, keys, "exact", HISTORY[:96])                           # fills its last block exactly
    _queue(redis_client, keys, "recompute", HISTORY[:50], output=HISTORY[50:])  # preempted: prompt + output
    snap = RedisState(redis_client, keys).snapshot()
    assert snap.waiting == (Waiting(1.7e9, 140, 96), Waiting(1.7e9, 100, 0), Waiting(1.7e9, 96, 80),
                            Waiting(1.7e9, 100, 96))
    assert [w.uncached_tokens for w in snap.waiting] == [44, 100, 16, 4]      # at least the last token runs
    assert (snap.kv_cached_blocks, snap.kv_evictable_blocks, snap.kv_free_blocks, snap.block_size) == (6, 6, 64, 16)
    state = Controller._queue_state(snap)
    assert [(r.prompt_tokens, r.computed_tokens, r.cached_tokens) for r in state.waiting] == [
        (140, 0, 96), (100, 0, 0), (96, 0, 80), (100, 0, 96)]
    assert state.block_size == 16


def test_no_lookup_without_caching_or_under_another_memory(redis_client, keys):
    _served(_pool(redis_client, keys), HISTORY)
    _queue(redis_client, keys, "next-turn", HISTORY + [7])
    state = RedisState(redis_client, keys)
    assert state.snapshot().waiting == (Waiting(1.7e9, 101, 0),)               # no worker reports yet
    _report(redis_client, keys, caching=False)                                  # --no-prefix-caching
    before = _hmgets(redis_client)
    assert state.snapshot().waiting == (Waiting(1.7e9, 101, 0),)
    assert _hmgets(redis_client) == before + 1                                  # kv_meta only: no lookup
    _report(redis_client, keys, salt="another-arena-memory")                     # the arena restarted
    assert state.snapshot().waiting == (Waiting(1.7e9, 101, 0),)
    redis_client.delete(keys.worker_stats("prefill"))
    _report(redis_client, keys, phase="colocated")                              # a colocated stack
    assert state.snapshot().waiting == (Waiting(1.7e9, 101, 96),)


def test_the_lookup_is_bounded_one_hmget_per_prompt_examined(redis_client, keys):
    _served(_pool(redis_client, keys), HISTORY)
    _report(redis_client, keys)
    for i in range(5):
        _queue(redis_client, keys, f"r{i}", HISTORY + [i], arrival=1.7e9 + i)
    state = RedisState(redis_client, keys, PromptKeys(max_prompts=3))
    before = _hmgets(redis_client)
    snap = state.snapshot()
    assert [w.cached_tokens for w in snap.waiting] == [96, 96, 96, 0, 0]       # the oldest three only
    assert _hmgets(redis_client) == before + 1 + 3                              # kv_meta, then one per prompt
    keyed = RedisState(redis_client, keys, PromptKeys(max_keys=13))             # 6 keys a prompt: two fit
    assert [w.cached_tokens for w in keyed.snapshot().waiting] == [96, 96, 0, 0, 0]
