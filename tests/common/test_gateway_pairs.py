"""A gateway in front of two pairs, against a real redis-server: it routes by load, sees a pair whose
workers stopped reporting as dead, and sends that pair's requests again to the other one so that the
client gets every token exactly once. The "workers" are the test writing reports and publishing
deliveries as workers do (the real processes: tests/e2e/test_pairs.py)."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

import redis.asyncio as aioredis

from services.common import stream_entries
from services.common.contracts import CancelNotice, KeySpace, QueuedRequest, WorkerReport, from_json
from services.engine.prefix_hash import reusable_keys
from services.engine.sampling_params import SamplingParams
from services.gateway.failover import move_once
from services.gateway.frontend import Frontend, GenerateInput
from services.gateway.pairs import DEAD_AFTER_S, Pairs
from tests.common.test_gateway_adoption import TEXT, TOKENS, make_frontend, publish, start, wait_until


def _report(phase: str, updated_at: float, running: int = 0, draining: bool = False, salt: str = "") -> WorkerReport:
    return WorkerReport(phase, f"{phase}-1", "127.0.0.1:1", 0.5, (0,), 0, running, 0, 1, 90, 100, updated_at,
                        draining=draining, prefix_caching=bool(salt), cache_salt=salt)


async def _report_pair(client: aioredis.Redis, prefix: str, age_s: float = 0.0, **kw) -> None:
    keys = KeySpace(prefix)
    for phase in ("prefill", "decode"):
        await client.hset(keys.worker_stats(phase), mapping=stream_entries.report_mapping(
            _report(phase, time.time() - age_s, **kw)))


def _two_pair_frontend(url: str) -> tuple[Frontend, tuple[str, str]]:
    base = f"t{uuid.uuid4().hex[:10]}"
    frontend = make_frontend(url, base)
    prefixes = (f"{base}:p0", f"{base}:p1")
    frontend.config = replace(frontend.config, pair_prefixes=prefixes)
    frontend.pairs = Pairs(frontend.client, prefixes)
    return frontend, prefixes


async def _queued(client: aioredis.Redis, prefix: str) -> list[QueuedRequest]:
    return [from_json(QueuedRequest, f[b"m"]) for _, f in await client.xrange(KeySpace(prefix).prefill_queue)]


def test_pairs_view_alive_draining_and_load(redis_server):
    asyncio.run(_pairs_view_alive_draining_and_load(redis_server))


async def _pairs_view_alive_draining_and_load(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    base = f"t{uuid.uuid4().hex[:10]}"
    pairs = Pairs(client, (f"{base}:p0", f"{base}:p1", f"{base}:p2"))
    await _report_pair(client, f"{base}:p0", running=3)
    await _report_pair(client, f"{base}:p1", age_s=DEAD_AFTER_S + 1)
    await _report_pair(client, f"{base}:p2", draining=True)
    await pairs.refresh()
    assert [(p.alive, p.draining, p.running) for p in pairs.loads] == [(True, False, 3), (False, False, 0),
                                                                      (True, True, 0)]
    assert pairs.dead_pairs() == {f"{base}:p1"}
    assert [await pairs.route([1, 2, 3]) for _ in range(2)] == [f"{base}:p0"] * 2   # the only one taking work
    await client.aclose()


def test_a_burst_is_spread_before_the_next_refresh(redis_server):
    asyncio.run(_a_burst_is_spread_before_the_next_refresh(redis_server))


async def _a_burst_is_spread_before_the_next_refresh(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    base = f"t{uuid.uuid4().hex[:10]}"
    pairs = Pairs(client, (f"{base}:p0", f"{base}:p1"))
    for p in pairs.prefixes:
        await _report_pair(client, p)
    await pairs.refresh()
    routed = [await pairs.route([1, 2, 3]) for _ in range(6)]
    assert routed.count(f"{base}:p0") == routed.count(f"{base}:p1") == 3
    await client.aclose()


def test_a_dead_pairs_request_is_sent_again_and_the_client_gets_each_token_once(redis_server):
    asyncio.run(_a_dead_pairs_request_is_sent_again_and_the_client_gets_each_token_once(redis_server))


async def _a_dead_pairs_request_is_sent_again_and_the_client_gets_each_token_once(redis_server):
    frontend, (p0, p1) = _two_pair_frontend(redis_server.url)
    await _report_pair(frontend.client, p0)
    await _report_pair(frontend.client, p1, running=50)            # busy: the request goes to p0
    await frontend.pairs.refresh()
    takeover = await start(frontend)
    reader = asyncio.create_task(frontend.read_replies())
    chunks: list = []
    req = GenerateInput("", SamplingParams(max_tokens=len(TOKENS), ignore_eos=True), token_ids=(1, 2, 3))

    async def consume() -> None:
        async for chunk in frontend.generate(req):
            chunks.append(chunk)
    task = asyncio.create_task(consume())
    await wait_until(lambda: frontend.requests)
    (first,) = await _queued(frontend.client, p0)
    await publish(frontend, first.request_id, 0, 5)                # five tokens from p0, then it dies
    await wait_until(lambda: sum(len(c.text) for c in chunks) == 5)
    await _report_pair(frontend.client, p0, age_s=DEAD_AFTER_S + 1)
    await _report_pair(frontend.client, p1)
    await frontend.pairs.refresh()
    assert await move_once(frontend) == 1
    (again,) = await _queued(frontend.client, p1)
    assert again.request_id != first.request_id and again.prompt_token_ids == (1, 2, 3)
    assert again.output_token_ids == tuple(TOKENS[:5])            # p1 goes on after what the client has
    cancels = [from_json(CancelNotice, f[b"m"]) for _, f in await frontend.client.xrange(KeySpace(p0).cancel)]
    assert [c.request_id for c in cancels] == [first.request_id]   # for when p0 comes back
    await publish(frontend, first.request_id, 5, 7)               # late tokens of the dead pair: dropped
    await publish(frontend, again.request_id, 5, len(TOKENS), finish="length")
    await asyncio.wait_for(task, 10)
    assert "".join(c.text for c in chunks) == TEXT
    assert await move_once(frontend) == 0
    reader.cancel()
    await takeover.close()
    await frontend.client.aclose()


def test_a_prompt_goes_to_the_pair_whose_cache_holds_its_prefix(redis_server):
    asyncio.run(_a_prompt_goes_to_the_pair_whose_cache_holds_its_prefix(redis_server))


async def _a_prompt_goes_to_the_pair_whose_cache_holds_its_prefix(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    base = f"t{uuid.uuid4().hex[:10]}"
    pairs = Pairs(client, (f"{base}:p0", f"{base}:p1"))
    for i, prefix in enumerate(pairs.prefixes):
        await _report_pair(client, prefix, running=2 - 2 * i, salt=f"memory-{i}")   # p1 the less loaded ...
    await pairs.refresh()
    prompt = list(range(1, 101))                                  # 6 reusable full blocks of 16
    keys = reusable_keys(prompt, 16, "memory-0")                  # ... but p0 holds the prefix
    await client.hset(KeySpace(f"{base}:p0").kv_cache_index, mapping={k: b for b, k in enumerate(keys[:5])})
    assert await pairs._cached_blocks(prompt, 16) == ([5, 0], len(keys))
    assert await pairs.route(prompt, 16) == f"{base}:p0"
    assert await pairs.route(list(range(500, 600)), 16) == f"{base}:p1"     # nothing cached: by load
    await client.aclose()
