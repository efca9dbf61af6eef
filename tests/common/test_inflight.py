"""A request's output as the gateway keeps it (services.gateway.inflight): pure, no Redis."""
from __future__ import annotations

import asyncio

from services.common.contracts import TokenDelivery, TokenLogprob
from services.engine.sampling_params import SamplingParams
from services.gateway.inflight import InFlight, RequestRecord, oldest_since, stream_id_key


def make_request(since: str = "0-0", logprobs: int | None = None) -> InFlight:
    return InFlight(RequestRecord("c", "c#1", True, (1, 2), 2, SamplingParams(logprobs=logprobs), 0.0, since))


def test_tokens_delivered_again_are_kept_once_at_their_positions():
    request = make_request(logprobs=0)
    lp = [TokenLogprob(t, -float(t)) for t in range(10, 16)]
    assert request.add(TokenDelivery("c#1", (10, 11), position=0, logprobs=tuple(lp[:2]), queue_time_ms=5.0), 1.0) == 2
    assert request.add(TokenDelivery("c#1", (11, 12), position=1, logprobs=tuple(lp[1:3])), 2.0) == 1   # 11 again
    assert request.add(TokenDelivery("c#1", (10, 11, 12), position=0, logprobs=tuple(lp[:3])), 3.0) == 0  # replayed
    assert request.add(TokenDelivery("c#1", (13,), "length", position=3, logprobs=tuple(lp[3:4])), 4.0) == 1
    assert request.token_ids == [10, 11, 12, 13]
    assert request.logprobs == lp[:4]
    assert (request.finish, request.queue_time_ms, request.first_token_at, request.last_token_at) == \
        ("length", 5.0, 1.0, 4.0)


def test_the_first_finish_wins_and_an_error_keeps_its_message():
    request = make_request()
    request.add(TokenDelivery("c#1", (), "error", error="worker gone"), 1.0)
    request.add(TokenDelivery("c#1", (), "cancelled"), 2.0)
    assert (request.finish, request.error, request.token_ids, request.is_running) == ("error", "worker gone", [], True)


def test_a_new_subscriber_takes_over_and_wakes_the_old_one():
    async def scenario() -> tuple[bool, bool, bool]:
        request = make_request()
        first = request.subscribe()
        waiting = asyncio.create_task(request.wait_for_more(first, 0, stall_timeout_s=5))
        await asyncio.sleep(0.01)
        second = request.subscribe()
        woke = await asyncio.wait_for(waiting, 1)
        return woke, request.is_current(first), request.is_current(second)
    assert asyncio.run(scenario()) == (True, False, True)


def test_waiting_ends_on_new_tokens_or_a_stall():
    async def scenario() -> tuple[bool, bool]:
        request = make_request()
        me = request.subscribe()
        asyncio.get_running_loop().call_later(0.02, request.add, TokenDelivery("c#1", (7,), position=0), 1.0)
        got = await request.wait_for_more(me, 0, stall_timeout_s=5)
        stalled = await request.wait_for_more(me, 1, stall_timeout_s=0.05)
        return got, stalled
    assert asyncio.run(scenario()) == (True, False)


def test_an_adopted_request_is_an_orphan_until_someone_attaches():
    request = make_request()
    assert not request.is_orphan_for(1.0, now=100.0)      # a live request (never adopted) is never one
    request.orphan_since = 10.0
    assert not request.is_orphan_for(5.0, now=14.0)
    assert request.is_orphan_for(5.0, now=15.0)
    request.subscribe()
    assert not request.is_orphan_for(5.0, now=1000.0)


def test_the_reply_stream_is_kept_from_the_oldest_request_in_flight():
    assert stream_id_key("1700000000000-12") == (1700000000000, 12)
    assert stream_id_key(b"5-0") < stream_id_key("10-0")       # numeric, not text order
    requests = [make_request("20-1"), make_request("9-5"), make_request("30-0")]
    assert oldest_since(requests, cursor="40-0") == "9-5"
    assert oldest_since([], cursor="40-0") == "40-0"
    assert oldest_since([make_request("50-0")], cursor="40-0") == "40-0"
