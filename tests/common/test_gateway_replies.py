"""The gateway's reply reader against a real Redis: a delivery published between two reads is not lost."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from services.common.contracts import TokenDelivery, to_json
from services.gateway.config import GatewayConfig
from services.gateway.frontend import Frontend
from services.gateway.metrics import GatewayMetrics


class _PublishAfterFirstRead:
    """The real client, except that its first XREAD comes back empty (as a read that timed out) and a
    worker's first token for "r1" lands right after it, before the reader's next XREAD."""

    def __init__(self, client: aioredis.Redis, stream: str) -> None:
        self.client, self.stream, self.reads = client, stream, 0

    def __getattr__(self, name: str):
        return getattr(self.client, name)

    async def xread(self, streams: dict, count: int, block: int):
        self.reads += 1
        if self.reads > 1:
            return await self.client.xread(streams, count=count, block=block)
        got = await self.client.xread(streams, count=count, block=1)
        await self.client.xadd(self.stream, {"m": to_json(TokenDelivery("r1", (55,), None))})
        return got


def test_a_first_token_published_between_two_reads_reaches_its_request(redis_server, keys):
    async def scenario() -> TokenDelivery:
        client = aioredis.Redis.from_url(redis_server.url)
        config = GatewayConfig(redis_url=redis_server.url, key_prefix=keys.prefix, port=0, gateway_id="gw-test")
        frontend = Frontend(config, client, GatewayMetrics())
        frontend.client = _PublishAfterFirstRead(client, frontend.reply_stream)
        frontend.pending["r1"] = queue = asyncio.Queue()
        reader = asyncio.create_task(frontend.read_replies())
        try:
            return await asyncio.wait_for(queue.get(), timeout=5)
        finally:
            reader.cancel()
            await asyncio.wait({reader}, timeout=2)      # the reader loops until cancelled
            await client.aclose()

    assert asyncio.run(scenario()).token_ids == (55,)
