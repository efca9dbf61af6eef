"""The gateway's Frontend and RedisWatch against a real redis-server that is killed and started again:
NOT_SERVING while it is away (new requests refused with UNAVAILABLE, a stream's reader waiting, a
cancel kept), SERVING once it is back (the cancel written, the stream's token read); a Redis that
came back empty fails the streams in flight and gets the model info again."""
from __future__ import annotations

import asyncio
import time

import pytest
import redis

from services.common import redis_retry
from services.common.contracts import TokenDeliveries, TokenDelivery, to_json
from services.common.model_info import ModelInfo, read_model_info
from services.common.redis_server import start_redis_server
from services.engine.sampling_params import SamplingParams
from services.gateway.config import GatewayConfig
from services.gateway.errors import NotReady
from services.gateway import request_ids
from services.gateway.frontend import Frontend, GenerateInput
from services.gateway.inflight import RequestRecord
from services.gateway.metrics import GatewayMetrics
from services.gateway.redis_watch import DATA_LOST, RedisWatch

INFO = ModelInfo("m", "/m", "Llama", 1000, 128, 16, 64, (2,), "float32", "split")


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _kill(server) -> None:
    server.process.kill()
    server.process.wait()


@pytest.mark.parametrize("appendonly", [True, False], ids=["with-its-file", "empty"])
def test_the_gateway_is_not_serving_while_redis_is_away_and_goes_on_after(tmp_path, appendonly):
    servers = [start_redis_server(tmp_path, appendonly=appendonly)]
    url, port = servers[0].url, servers[0].port
    serving: list[bool] = []

    async def scenario() -> None:
        frontend = Frontend(GatewayConfig(url, "t", 0), redis_retry.async_client(url), GatewayMetrics())
        frontend.info = INFO
        frontend.metrics.bind_model(INFO.name)
        request = frontend._track(RequestRecord("r1", "r1", False, (5,), 1, SamplingParams(), time.time(), "0-0"),
                                  request_ids.RequestIds("r1", "r1", None))

        async def set_serving(is_serving: bool) -> None:
            serving.append(is_serving)

        tasks = [asyncio.create_task(RedisWatch(frontend, set_serving).run()),
                 asyncio.create_task(frontend.read_replies())]
        try:
            await asyncio.sleep(0.3)                       # the first probe: up, epoch known
            assert serving == [] and frontend.redis_ok
            _kill(servers[0])
            await _until(lambda: serving == [False])
            assert not frontend.redis_ok
            with pytest.raises(NotReady, match="Redis is unreachable"):
                async for _ in frontend.generate(GenerateInput("", SamplingParams(), token_ids=(5, 6))):
                    pass
            await frontend._cancel("r0", "cancelled")      # kept for later
            assert len(frontend.outbox) == 1
            servers.append(start_redis_server(tmp_path, port, appendonly=appendonly))
            await _until(lambda: serving == [False, True])
            assert frontend.redis_ok and not frontend.outbox
            check = redis.Redis.from_url(url)
            # the kept cancel went out; after an empty restart it is dropped (no such request any more)
            assert check.xlen(frontend.keys.cancel) == (1 if appendonly else 0)
            if appendonly:                                   # the reader goes on at its cursor
                check.xadd(frontend.reply_stream, {"m": to_json(TokenDeliveries((TokenDelivery("r1", (7,)),)))})
                await _until(lambda: request.token_ids == [7])
            else:                                            # the stream failed, saying to retry; info back
                await _until(lambda: request.finish == "error")
                assert request.error == DATA_LOST
                assert read_model_info(check, frontend.keys.model_info) == INFO
            check.close()
        finally:
            for task in tasks:
                task.cancel()
            await frontend.client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        for server in servers:
            server.stop()
