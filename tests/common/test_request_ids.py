"""The gateway's request ids against a real redis-server: a client's id is claimed once across
gateways, engine ids never repeat, a claim is released only by its owner and expires."""
from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.gateway import request_ids
from services.gateway.errors import InvalidInput


def test_claims(redis_server, keys):
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        made_up = await request_ids.claim(client, keys, "")
        assert made_up.claim_key is None and made_up.client_id == made_up.engine_id
        first = await request_ids.claim(client, keys, "mine")
        assert first.client_id == "mine" and first.engine_id.startswith("mine#")
        with pytest.raises(InvalidInput, match="already running"):       # another gateway, same stack
            await request_ids.claim(client, keys, "mine")
        assert 0 < await client.ttl(keys.request_claim("mine")) <= request_ids.CLAIM_TTL_S
        await request_ids.release(client, first)
        second = await request_ids.claim(client, keys, "mine")            # free again once it ended
        assert second.engine_id != first.engine_id
        await request_ids.release(client, first)                          # not the owner: nothing happens
        assert await client.get(keys.request_claim("mine")) == second.engine_id.encode()
        for bad in ("x" * 129, "tab\there"):
            with pytest.raises(InvalidInput, match="printable"):
                await request_ids.claim(client, keys, bad)
        await client.aclose()

    asyncio.run(run())
