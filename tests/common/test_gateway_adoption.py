"""A gateway dying with requests in flight, against a real redis-server: its successor (same configured
gateway id) adopts them, a client re-attaching gets exactly the tokens it is missing, and an orphan is
cancelled. (Peers adopting a dead gateway's requests: test_gateway_takeover.py.)

The "worker" here is the test publishing TokenDeliveries on the reply stream as a worker does; the
tokenizer is one character per token id, so that the text is easy to check. A gateway "dies" by
losing Redis before its tasks are cancelled: what it would do on the way out never lands, as after a
kill -9 (tests/chaos/test_gateway.py kills the real process); its lease is deleted, as its expiry would.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from services.common.contracts import (CancelNotice, QueuedRequest, TokenDeliveries, TokenDelivery, from_json,
                                       to_json)
from services.engine.sampling_params import SamplingParams
from services.gateway import adoption
from services.gateway.config import GatewayConfig
from services.gateway.errors import InvalidInput, NotReady, RequestNotFound, Superseded
from services.gateway.prompts import PromptEncoder, PromptLimits
from services.gateway.frontend import Frontend, GenerateInput
from services.gateway.replies import TRIM_INTERVAL_S
from services.gateway.inflight import RequestRecord
from services.gateway.metrics import GatewayMetrics
from services.gateway.takeover import Takeover
from tests.common.char_detokenizer import CharDetokenizer

TEXT = "Hello world!"
TOKENS = [ord(c) for c in TEXT]


class _DeadRedis:
    """What a killed gateway still manages to do in Redis: nothing."""

    def __getattr__(self, name: str):
        async def fail(*args, **kwargs):
            raise aioredis.ConnectionError("the process is dead")
        return fail

    def pipeline(self, *args, **kwargs):
        raise aioredis.ConnectionError("the process is dead")


def make_frontend(url: str, prefix: str, orphan_timeout_s: float = 30.0, gateway_id: str = "gw-same") -> Frontend:
    config = GatewayConfig(redis_url=url, key_prefix=prefix, port=0, gateway_id=gateway_id,
                           orphan_timeout_s=orphan_timeout_s, stall_timeout_s=10.0)
    frontend = Frontend(config, aioredis.Redis.from_url(url), GatewayMetrics("m"))
    frontend.tokenizer = SimpleNamespace(detokenizer=lambda prompt: CharDetokenizer())
    frontend.info = SimpleNamespace(eos_token_ids=(0,), vocab_size=1000, max_model_len=4096, block_size=16,
                                    num_kv_blocks=512)
    frontend.prompts = PromptEncoder(frontend.tokenizer, PromptLimits(10_000, 8, 4096, 1000, 16))   # token ids only
    return frontend


async def publish(frontend: Frontend, engine_id: str, start: int, stop: int, finish: str | None = None) -> None:
    """As a worker: one entry per token, each with its position."""
    for i in range(start, stop):
        last = finish if i == stop - 1 else None
        await frontend.client.xadd(frontend.reply_stream, {"m": to_json(TokenDeliveries((
            TokenDelivery(engine_id, (TOKENS[i],), last, position=i),)))})


async def wait_until(check, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def accept(frontend: Frontend, request_id: str, chunks: list) -> tuple[asyncio.Task, str]:
    """Start a Generate through `frontend`; -> its consuming task and the engine id it was queued under."""
    req = GenerateInput(request_id, SamplingParams(max_tokens=len(TOKENS), ignore_eos=True), token_ids=(1, 2, 3))
    accepted: list[str] = []

    async def on_accepted(client_id: str) -> None:
        accepted.append(client_id)

    async def consume() -> None:
        async for chunk in frontend.generate(req, on_accepted):
            chunks.append(chunk)
    task = asyncio.create_task(consume())
    await wait_until(lambda: accepted)
    entries = await frontend.client.xrange(frontend.keys.prefill_queue)
    return task, from_json(QueuedRequest, entries[-1][1][b"m"]).request_id


async def noise(frontend: Frontend) -> None:
    """Deliveries for requests of no interest, read by the gateway, and one more a trim interval later:
    the gateway trims its reply stream after reading it."""
    for i in range(301):
        if i == 300:
            await asyncio.sleep(TRIM_INTERVAL_S)
        await frontend.client.xadd(frontend.reply_stream, {"m": to_json(TokenDelivery("other", (1,), position=i))})
        last = (await frontend.client.xinfo_stream(frontend.reply_stream))["last-generated-id"].decode()
    await wait_until(lambda: frontend.cursor == last)
    await asyncio.sleep(0.1)                            # its XTRIM after the batch


async def start(frontend: Frontend, takeover_s: float = 60.0) -> Takeover:
    """What the gateway's main does before it says SERVING (no renewals: tests call them)."""
    takeover = Takeover(frontend, takeover_s)
    await takeover.start()
    return takeover


async def kill(frontend: Frontend, *tasks: asyncio.Task) -> None:
    """The process dies: nothing it would still do lands, and (some seconds later) its lease expires."""
    survivor = aioredis.Redis.from_url(frontend.config.redis_url)
    await survivor.delete(frontend.keys.gateway_lease(frontend.gateway_id))
    await survivor.aclose()
    frontend.client = _DeadRedis()
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=2)


def test_a_restarted_gateway_adopts_its_requests_and_a_client_gets_exactly_what_it_missed(redis_server, keys):
    async def scenario():
        old = make_frontend(redis_server.url, keys.prefix)
        await start(old)
        reader = asyncio.create_task(old.read_replies())
        await noise(old)                                # earlier requests' traffic, trimmed once read
        chunks: list = []
        consumer, engine_id = await accept(old, "client-1", chunks)
        await publish(old, engine_id, 0, 5)
        await wait_until(lambda: sum(len(c.token_ids) for c in chunks) == 5)
        await publish(old, engine_id, 5, 9)              # read by the old gateway: the client may never see them
        await wait_until(lambda: len(old.requests[engine_id].token_ids) == 9)
        await noise(old)                                # the stream is trimmed, but never past client-1's start
        length = await old.client.xlen(old.reply_stream)
        await kill(old, reader, consumer)
        survivor = aioredis.Redis.from_url(redis_server.url)
        helper = SimpleNamespace(client=survivor, reply_stream=old.reply_stream)
        await publish(helper, engine_id, 7, 12, finish="length")   # 7, 8 again (a worker recomputed them)

        new = make_frontend(redis_server.url, keys.prefix)
        with pytest.raises(NotReady):
            await anext(new.attach("client-1", 5))
        takeover = await start(new)
        assert len(new.requests) == 1
        reader = asyncio.create_task(new.read_replies())
        with pytest.raises(RequestNotFound, match="send it again"):
            await anext(new.attach("nobody", 0))
        with pytest.raises(InvalidInput, match="num_received_tokens"):
            await anext(new.attach("client-1", 13))
        rest = [c async for c in new.attach("client-1", 5)]
        reader.cancel()
        left = (await survivor.exists(keys.gateway_requests(old.gateway_id), keys.gateway_lease(old.gateway_id)),
                await survivor.pttl(keys.reply(old.gateway_id)) > 0,         # expiring, not gone: a late delivery
                await survivor.get(keys.request_claim("client-1")), await survivor.xlen(keys.cancel),
                await survivor.hexists(keys.gateways, old.gateway_id), takeover.adopted)
        await survivor.aclose()
        await new.client.aclose()
        return chunks, rest, left, length

    chunks, rest, left, length = asyncio.run(scenario())
    assert length < 600                  # the first 301 went (in whole macro nodes: XTRIM ~ MINID)
    assert [t for c in chunks for t in c.token_ids] == TOKENS[:len([t for c in chunks for t in c.token_ids])]
    assert [t for c in rest for t in c.token_ids] == TOKENS[5:]           # once each, none missing
    assert "".join(c.text for c in rest) == TEXT[5:]                      # the text goes on where it stopped
    assert rest[-1].finish_reason == "length" and rest[-1].usage.completion_tokens == len(TOKENS)
    assert rest[-1].usage.prompt_tokens == 3 and all(c.request_id == "client-1" for c in rest)
    assert left == (0, True, None, 0, False, set())   # the old id's keys and claim gone; finished: nothing to cancel


def test_an_adopted_request_nobody_comes_back_for_is_cancelled_after_the_timeout(redis_server, keys):
    async def scenario():
        client = aioredis.Redis.from_url(redis_server.url)
        record = RequestRecord("orphan", "orphan#1", True, (1,), 1, SamplingParams(), 0.0, "0-0")
        dead = "gw-same~0dead000"
        pipe = client.pipeline(transaction=True)            # what the dead gateway left (its lease expired)
        adoption.save(pipe, keys, dead, record)
        pipe.set(keys.request_claim("orphan"), "orphan#1")
        pipe.hset(keys.gateways, dead, 1)
        await pipe.execute()
        await client.xadd(keys.reply(dead), {"m": to_json(TokenDelivery("orphan#1", (72,), position=0))})

        new = make_frontend(redis_server.url, keys.prefix, orphan_timeout_s=0.3)
        await start(new)
        assert new.requests["orphan#1"].token_ids == [72]
        sweeper = asyncio.create_task(new.sweep_orphans())
        await wait_until(lambda: not new.requests, timeout=5)
        sweeper.cancel()
        with pytest.raises(RequestNotFound):
            await anext(new.attach("orphan", 0))
        cancels = [from_json(CancelNotice, data[b"m"]) for _id, data in await client.xrange(keys.cancel)]
        left = (await client.exists(keys.gateway_requests(dead), keys.gateway_lease(dead)),
                await client.get(keys.request_claim("orphan")), await client.pttl(keys.reply(dead)) > 0)
        await client.aclose()
        await new.client.aclose()
        return cancels, left

    cancels, left = asyncio.run(scenario())
    assert cancels == [CancelNotice("orphan#1", "cancelled")]      # the workers free its blocks
    assert left == (0, None, True)


def test_attaching_to_a_live_request_takes_it_over_and_the_first_call_ends(redis_server, keys):
    async def scenario():
        gateway = make_frontend(redis_server.url, keys.prefix)
        await start(gateway)
        reader = asyncio.create_task(gateway.read_replies())
        first: list = []
        consumer, engine_id = await accept(gateway, "live", first)
        await publish(gateway, engine_id, 0, 3)
        await wait_until(lambda: sum(len(c.token_ids) for c in first) == 3)
        second = gateway.attach("live", 2)                  # it says it has 2: gets the third again
        got = [await anext(second)]
        await asyncio.wait({consumer}, timeout=2)
        await publish(gateway, engine_id, 3, len(TOKENS), finish="length")
        got += [c async for c in second]
        reader.cancel()
        cancels = await gateway.client.xlen(keys.cancel)
        await gateway.client.aclose()
        return first, consumer.exception(), got, cancels

    first, error, got, cancels = asyncio.run(scenario())
    assert isinstance(error, Superseded)
    assert [t for c in got for t in c.token_ids] == TOKENS[2:]
    assert "".join(c.text for c in got) == TEXT[2:]
    assert cancels == 0                                       # the first call's end did not cancel the request
