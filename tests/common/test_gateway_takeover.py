"""A gateway that never comes back under its id, against a real redis-server: another live gateway adopts
its requests (at once for an Attach, after the grace otherwise), exactly one of several trying at once
wins, the original coming back late gets nothing, and an adopter that dies is taken over in turn.

Gateways are Frontends in this one process (their leases all name it, so a "dead" one has its lease
deleted, as its expiry would); the worker is the test publishing deliveries (test_gateway_adoption.py).
"""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.common.contracts import CancelNotice, from_json
from services.gateway import peers
from services.gateway.errors import NotReady
from services.gateway.takeover import LeaseLost
from tests.common.test_gateway_adoption import TEXT, TOKENS, accept, kill, make_frontend, publish, start, wait_until


async def _reading(*frontends):
    return [asyncio.create_task(f.read_replies()) for f in frontends]


def test_an_attach_through_another_gateway_adopts_a_dead_gateways_requests_at_once(redis_server, keys):
    async def scenario():
        a = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-a")
        b = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-b")
        await start(a)
        takeover_b = await start(b)
        readers = await _reading(a, b)
        chunks: list = []
        consumer, engine_id = await accept(a, "client-1", chunks)
        await publish(a, engine_id, 0, 5)
        await wait_until(lambda: sum(len(c.token_ids) for c in chunks) == 5)
        with pytest.raises(NotReady, match=f"streamed by gateway {a.gateway_id}, which is alive"):
            await anext(b.attach("client-1", 5))
        await kill(a, readers[0], consumer)
        rest = await _finishing(b, a, "client-1", engine_id)
        survivor = aioredis.Redis.from_url(redis_server.url)
        left = (await survivor.exists(keys.gateway_requests(a.gateway_id), keys.gateway_lease(a.gateway_id)),
                await survivor.pttl(keys.reply(a.gateway_id)) > 0)
        registered = await survivor.hkeys(keys.gateways)
        for task in readers:
            task.cancel()
        await survivor.aclose()
        await b.client.aclose()
        return rest, left, registered, takeover_b.adopted

    rest, left, registered, adopted = asyncio.run(scenario())
    assert [t for c in rest for t in c.token_ids] == TOKENS[5:]          # once each, none missing
    assert "".join(c.text for c in rest) == TEXT[5:]
    assert rest[-1].finish_reason == "length"
    assert left == (0, True) and adopted == set()    # the dead id's keys gone once its request ended (its
                                                     # reply stream expiring: a worker's last delivery may come)
    assert [r.decode().split("~")[0] for r in registered] == ["gw-b"]


async def _finishing(adopter, dead, client_id: str, engine_id: str) -> list:
    """An Attach on the adopter; the worker publishes the rest once the adopter follows the request."""
    async def consume() -> list:
        return [c async for c in adopter.attach(client_id, 5)]
    task = asyncio.create_task(consume())
    await wait_until(lambda: engine_id in adopter.requests)
    survivor = aioredis.Redis.from_url(dead.config.redis_url)
    helper = type("Worker", (), {"client": survivor, "reply_stream": dead.reply_stream})
    await publish(helper, engine_id, 5, len(TOKENS), finish="length")
    await survivor.aclose()
    return await task


def test_of_gateways_adopting_at_once_exactly_one_wins_and_the_late_original_gets_nothing(redis_server, keys):
    async def scenario():
        a = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-a")
        await start(a)
        reader = (await _reading(a))[0]
        consumers, engine_ids = [], []
        for name in ("r1", "r2"):
            consumer, engine_id = await accept(a, name, [])
            await publish(a, engine_id, 0, 3)
            consumers.append(consumer)
            engine_ids.append(engine_id)
        await wait_until(lambda: all(len(a.requests[e].token_ids) == 3 for e in engine_ids))
        await kill(a, reader, *consumers)
        gateways = [make_frontend(redis_server.url, keys.prefix, gateway_id=f"gw-{n}") for n in "bcd"]
        takeovers = [await start(g, takeover_s=0.05) for g in gateways]
        await asyncio.sleep(0.1)                                   # the grace, since A's last renewal
        await asyncio.gather(*(t.scan() for t in takeovers[:2]),    # a peer's scan against another's scan
                             _attach_or_refused(gateways[2], "r1"))  # ... and against an Attach
        held = [sorted(g.requests) for g in gateways]
        late = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-a")   # A itself, back late
        await start(late)
        for g in gateways:
            await g.client.aclose()
        return held, engine_ids, late

    held, engine_ids, late = asyncio.run(scenario())
    assert sorted(held, key=len) == [[], [], sorted(engine_ids)]   # one adopter, with both requests
    assert late.requests == {}                                     # the original's successor finds them held


async def _attach_or_refused(frontend, client_id: str) -> None:
    try:
        await anext(frontend.attach(client_id, 3))
    except NotReady as e:
        assert "which is alive" in str(e)


def test_an_adopter_that_dies_is_taken_over_with_what_it_had_adopted(redis_server, keys):
    async def scenario():
        a = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-a")
        await start(a)
        reader = (await _reading(a))[0]
        consumer, engine_id = await accept(a, "r1", [])
        await publish(a, engine_id, 0, 4)
        await wait_until(lambda: len(a.requests[engine_id].token_ids) == 4)
        await kill(a, reader, consumer)
        b = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-b")
        c = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-c")
        takeover_b, takeover_c = await start(b, takeover_s=0.05), await start(c, takeover_s=0.05)
        await asyncio.sleep(0.1)
        await takeover_b.scan()
        assert engine_id in b.requests
        await kill(b)
        await b.client.aclose() if isinstance(b.client, aioredis.Redis) else None
        survivor = aioredis.Redis.from_url(redis_server.url)
        await survivor.delete(keys.gateway_lease(a.gateway_id))    # B's lease on A expires with its own
        await asyncio.sleep(0.1)
        await takeover_c.scan()
        tokens = list(c.requests[engine_id].token_ids)
        await survivor.aclose()
        await c.client.aclose()
        return tokens, takeover_c.adopted, a.gateway_id, b.gateway_id

    tokens, adopted, a_id, b_id = asyncio.run(scenario())
    assert tokens == TOKENS[:4]                       # replayed from A's reply stream, nothing lost
    assert adopted == {a_id}                          # B's own id had nothing: released at once
    assert b_id not in adopted


def test_a_gateway_whose_own_id_was_taken_over_stops(redis_server, keys):
    async def scenario():
        a = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-a")
        takeover = await start(a)
        await a.client.set(keys.gateway_lease(a.gateway_id), peers.lease_value("gw-b~00000000"))
        with pytest.raises(LeaseLost, match="gw-b~00000000 holds this gateway's id"):
            await takeover.renew()
        await a.client.aclose()

    asyncio.run(scenario())


def test_a_dead_gateways_request_nobody_attaches_to_is_adopted_after_the_grace_and_cancelled(redis_server, keys):
    async def scenario():
        a = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-a")
        await start(a)
        reader = (await _reading(a))[0]
        consumer, engine_id = await accept(a, "lonely", [])
        await kill(a, reader, consumer)
        b = make_frontend(redis_server.url, keys.prefix, gateway_id="gw-b", orphan_timeout_s=0.3)
        takeover = await start(b, takeover_s=0.3)
        await takeover.scan()
        early = sorted(b.requests)                     # within the grace: not yet
        await asyncio.sleep(0.35)
        await takeover.scan()
        adopted = sorted(b.requests)
        sweeper = asyncio.create_task(b.sweep_orphans())
        await wait_until(lambda: not b.requests)
        sweeper.cancel()
        cancels = [from_json(CancelNotice, data[b"m"]).request_id for _id, data in await b.client.xrange(keys.cancel)]
        left = (await b.client.exists(keys.gateway_requests(a.gateway_id), keys.gateway_lease(a.gateway_id)),
                await b.client.hexists(keys.gateways, a.gateway_id), await b.client.get(keys.request_claim("lonely")))
        await b.client.aclose()
        return early, adopted, engine_id, cancels, left

    early, adopted, engine_id, cancels, left = asyncio.run(scenario())
    assert early == [] and adopted == [engine_id]
    assert cancels == [engine_id]                      # the workers free its blocks
    assert left == (0, False, None)                    # its gateway's keys and its id's claim gone
