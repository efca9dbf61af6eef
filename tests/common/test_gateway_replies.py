"""The gateway's reply reader against a real Redis: a delivery published between two reads is not lost."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from services.common.contracts import TokenDelivery, to_json
from services.engine.sampling_params import SamplingParams
from services.gateway.config import GatewayConfig
from services.gateway.frontend import Frontend
from services.gateway.inflight import RequestRecord
from services.gateway.metrics import GatewayMetrics
from services.gateway.request_ids import RequestIds


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
    async def scenario() -> list[int]:
        client = aioredis.Redis.from_url(redis_server.url)
        config = GatewayConfig(redis_url=redis_server.url, key_prefix=keys.prefix, port=0, gateway_id="gw-test")
        frontend = Frontend(config, client, GatewayMetrics("m"))
        frontend.client = _PublishAfterFirstRead(client, frontend.reply_stream)
        request = frontend._track(RequestRecord("r1", "r1", False, (1,), 1, SamplingParams(), 0.0, "0-0"),
                                  RequestIds("r1", "r1", None))
        reader = asyncio.create_task(frontend.read_replies())
        try:
            await asyncio.wait_for(request.changed.wait(), timeout=5)
            return request.token_ids
        finally:
            reader.cancel()
            await asyncio.wait({reader}, timeout=2)      # the reader loops until cancelled
            await client.aclose()

    assert asyncio.run(scenario()) == [55]
