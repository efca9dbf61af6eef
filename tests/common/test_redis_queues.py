"""Stream helpers against a real redis-server: groups, acks, bad entries, reclaim, tails, cancels."""
from __future__ import annotations

import logging
import time

import pytest
import redis

from services.common.contracts import CancelNotice, KeySpace, QueuedRequest, to_json
from services.common.redis_queues import (CancelWatcher, ack, claim_stale, enqueue, ensure_group, queue_depth,
                                          last_ids, read_group, read_own_pending, read_tail, tail_cursor)
from services.engine.sampling_params import SamplingParams

GROUP = "prefill"


def make_request(request_id: str, prompt_len: int = 3) -> QueuedRequest:
    return QueuedRequest(request_id, tuple(range(1, prompt_len + 1)), SamplingParams(max_tokens=4, stop=("x",)),
                         reply_to="duo:reply:g1", arrival_time=1.5)


@pytest.fixture(params=[False, True], ids=["bytes", "str"])
def client(request, redis_server):
    """Both kinds of client the services use."""
    c = redis.Redis.from_url(redis_server.url, decode_responses=request.param)
    yield c
    c.close()


def test_group_read_ack_and_depth(client, keys):
    stream = keys.prefill_queue
    assert queue_depth(client, stream, GROUP) == 0            # no stream yet
    sent = [make_request(f"r{i}") for i in range(3)]
    ids = [enqueue(client, stream, m) for m in sent]           # before the group exists: still delivered
    ensure_group(client, stream, GROUP)
    ensure_group(client, stream, GROUP)                        # idempotent
    assert queue_depth(client, stream, GROUP) == 3
    got = read_group(client, stream, GROUP, "w1", QueuedRequest, count=2, block_ms=0)
    assert got == list(zip(ids[:2], sent[:2]))                 # typed, tuples intact, ids as str
    assert queue_depth(client, stream, GROUP) == 3             # 1 undelivered + 2 pending
    assert ack(client, stream, GROUP, ids[:2]) == 2 and ack(client, stream, GROUP, []) == 0
    assert queue_depth(client, stream, GROUP) == 1
    assert read_group(client, stream, GROUP, "w1", QueuedRequest, count=10) == [(ids[2], sent[2])]
    assert read_group(client, stream, GROUP, "w1", QueuedRequest, count=0) == []


def test_a_consumer_reads_back_what_is_pending_with_it_and_nothing_else(client, keys):
    stream = keys.prefill_queue
    ensure_group(client, stream, GROUP)
    sent = [make_request(f"r{i}") for i in range(7)]
    ids = [enqueue(client, stream, m) for m in sent]
    read_group(client, stream, GROUP, "w1", QueuedRequest, count=5)
    read_group(client, stream, GROUP, "w2", QueuedRequest, count=1)
    ack(client, stream, GROUP, [ids[0]])
    client.xdel(stream, ids[1])                                # pending, but no longer in the stream
    assert read_own_pending(client, stream, GROUP, "w1", QueuedRequest, batch=2) == list(zip(ids[2:5], sent[2:5]))
    assert read_own_pending(client, stream, GROUP, "w2", QueuedRequest) == [(ids[5], sent[5])]
    assert read_own_pending(client, stream, GROUP, "w3", QueuedRequest) == []
    assert read_group(client, stream, GROUP, "w1", QueuedRequest, count=10) == [(ids[6], sent[6])]   # untouched
    assert read_own_pending(client, keys.decode_admit, GROUP, "w1", QueuedRequest) == []   # no group: made


def test_block_ms_zero_does_not_block_and_positive_waits(client, keys):
    ensure_group(client, keys.prefill_queue, GROUP)
    started = time.monotonic()
    assert read_group(client, keys.prefill_queue, GROUP, "w1", QueuedRequest, count=5, block_ms=0) == []
    assert read_group(client, keys.prefill_queue, GROUP, "w1", QueuedRequest, count=5, block_ms=None) == []
    assert time.monotonic() - started < 0.5                   # Redis's BLOCK 0 would wait forever
    started = time.monotonic()
    assert read_group(client, keys.prefill_queue, GROUP, "w1", QueuedRequest, count=5, block_ms=100) == []
    assert time.monotonic() - started >= 0.09


def test_malformed_entries_are_acked_and_skipped(client, keys, caplog):
    stream = keys.prefill_queue
    ensure_group(client, stream, GROUP)
    client.xadd(stream, {"m": "{not json"})
    client.xadd(stream, {"other": "1"})
    client.xadd(stream, {"m": '{"request_id": "r0"}'})         # valid JSON, missing fields
    client.xadd(stream, {"m": '{"request_id":"r1","prompt_token_ids":[1],"sampling":{"max_tokens":0},'
                              '"reply_to":"x","arrival_time":0}'})   # fails SamplingParams validation
    good = enqueue(client, stream, make_request("ok"))
    with caplog.at_level(logging.WARNING, logger="duoserve.queues"):
        got = read_group(client, stream, GROUP, "w1", QueuedRequest, count=10)
    assert got == [(good, make_request("ok"))]
    assert client.xpending(stream, GROUP)["pending"] == 1      # only the good one waits for its ack
    assert sum("skipping entry" in r.message for r in caplog.records) == 4


def test_claim_stale_takes_over_a_dead_consumers_entries(client, keys):
    stream = keys.prefill_queue
    ensure_group(client, stream, GROUP)
    ids = [enqueue(client, stream, make_request(f"r{i}")) for i in range(3)]
    taken = read_group(client, stream, GROUP, "dead", QueuedRequest, count=2)   # ... and it dies unacked
    assert [i for i, _ in taken] == ids[:2]
    assert claim_stale(client, stream, GROUP, "alive", QueuedRequest, min_idle_ms=60_000, count=10) == []
    time.sleep(0.03)
    claimed = claim_stale(client, stream, GROUP, "alive", QueuedRequest, min_idle_ms=20, count=10)
    assert claimed == taken
    pending = client.xpending_range(stream, GROUP, min="-", max="+", count=10)
    assert {_s(p["consumer"]) for p in pending} == {"alive"}
    assert all(p["times_delivered"] == 2 for p in pending)
    ack(client, stream, GROUP, ids[:2])
    assert queue_depth(client, stream, GROUP) == 1             # r2 was never delivered: still queued
    assert claim_stale(client, stream, GROUP, "alive", QueuedRequest, min_idle_ms=0, count=10) == []


def test_claim_stale_skips_entries_deleted_meanwhile(client, keys):
    stream = keys.prefill_queue
    ensure_group(client, stream, GROUP)
    ids = [enqueue(client, stream, make_request(f"r{i}")) for i in range(2)]
    read_group(client, stream, GROUP, "dead", QueuedRequest, count=2)
    client.xdel(stream, ids[0])
    claimed = claim_stale(client, stream, GROUP, "alive", QueuedRequest, min_idle_ms=0, count=10)
    assert [i for i, _ in claimed] == [ids[1]]


def test_a_lost_group_is_recreated(client, keys):
    stream = keys.prefill_queue
    ensure_group(client, stream, GROUP)
    client.delete(stream)                                      # Redis restarted empty, or keys deleted
    assert read_group(client, stream, GROUP, "w1", QueuedRequest, count=5) == []
    rid = enqueue(client, stream, make_request("after"))
    assert read_group(client, stream, GROUP, "w1", QueuedRequest, count=5) == [(rid, make_request("after"))]


def test_read_tail_from_dollar_sees_only_what_comes_after(client, keys):
    stream = keys.reply("g1")
    assert tail_cursor(client, stream) == "0-0"
    got, cursor = read_tail(client, stream, CancelNotice, "$", count=10)     # no stream yet
    assert got == [] and cursor == "0-0"
    first = enqueue(client, stream, CancelNotice("a"))                      # created after we looked
    got, cursor = read_tail(client, stream, CancelNotice, cursor, count=10)
    assert got == [(first, CancelNotice("a"))] and cursor == first

    got, late = read_tail(client, stream, CancelNotice, "$", count=10)       # a reader joining now
    assert got == [] and late == first
    client.xadd(stream, {"m": "garbage"})
    second = enqueue(client, stream, CancelNotice("b", "stop"))
    got, cursor = read_tail(client, stream, CancelNotice, late, count=10)
    assert got == [(second, CancelNotice("b", "stop"))] and cursor == second   # moved past the bad one
    started = time.monotonic()
    assert read_tail(client, stream, CancelNotice, cursor, count=10, block_ms=100) == ([], cursor)
    assert time.monotonic() - started >= 0.09


def test_read_tail_pages_with_count(client, keys):
    stream = keys.cancel
    ids = [enqueue(client, stream, CancelNotice(f"r{i}"), maxlen=100) for i in range(5)]
    got, cursor = read_tail(client, stream, CancelNotice, "0-0", count=2)
    assert [i for i, _ in got] == ids[:2] and cursor == ids[1]
    got, cursor = read_tail(client, stream, CancelNotice, cursor, count=10)
    assert [i for i, _ in got] == ids[2:]


def test_cancel_watcher_remembers_cancels_that_overtake_their_request(client, keys):
    enqueue(client, keys.cancel, CancelNotice("early"))          # before the worker even started
    watcher = CancelWatcher(keys)
    assert watcher.poll(client) == {"early"}
    assert watcher.poll(client) == set()                         # non-blocking, nothing new
    enqueue(client, keys.cancel, CancelNotice("r1"))
    enqueue(client, keys.cancel, CancelNotice("r1"))             # cancelled twice: reported once
    client.xadd(keys.cancel, {"m": "[]"})                        # a bad entry does not stop it
    enqueue(client, keys.cancel, CancelNotice("r2"))
    assert watcher.poll(client) == {"r1", "r2"}
    assert watcher.is_cancelled("early") and watcher.is_cancelled("r1") and not watcher.is_cancelled("r3")

    fresh = CancelWatcher(keys, replay=False)                    # starts at the tail: no history
    assert fresh.poll(client) == set() and not fresh.is_cancelled("r1")


def test_cancel_watcher_reads_a_backlog_in_batches(client, keys):
    pipe = client.pipeline()
    for i in range(25):
        pipe.xadd(keys.cancel, {"m": to_json(CancelNotice(f"r{i}"))})
    pipe.execute()
    watcher = CancelWatcher(keys, batch=10)
    assert watcher.poll(client) == {f"r{i}" for i in range(25)}


def test_cancel_watcher_forgets_by_count_and_age(client, keys):
    watcher = CancelWatcher(keys, max_ids=3)
    for i in range(5):
        enqueue(client, keys.cancel, CancelNotice(f"r{i}"))
    assert len(watcher.poll(client)) == 5
    assert len(watcher) == 3 and not watcher.is_cancelled("r0") and watcher.is_cancelled("r4")

    other = KeySpace(keys.prefix + "-b")
    short = CancelWatcher(other, ttl_s=0.2)
    short.poll(client)
    enqueue(client, other.cancel, CancelNotice("x"))
    assert short.poll(client) == {"x"} and short.is_cancelled("x")
    time.sleep(0.25)
    assert not short.is_cancelled("x")
    short.poll(client)
    assert len(short) == 0


def test_resp3_clients_decode_the_same(redis_server, keys):
    client = redis.Redis.from_url(redis_server.url, protocol=3)
    ensure_group(client, keys.prefill_queue, GROUP)
    rid = enqueue(client, keys.prefill_queue, make_request("r"))
    assert read_group(client, keys.prefill_queue, GROUP, "w", QueuedRequest, count=5) == [(rid, make_request("r"))]
    assert read_tail(client, keys.prefill_queue, QueuedRequest, "0-0", count=5) == ([(rid, make_request("r"))], rid)
    assert queue_depth(client, keys.prefill_queue, GROUP) == 1
    client.close()


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.parametrize("protocol", [2, 3])
def test_last_ids_of_a_read_over_several_streams(redis_server, keys, protocol):
    client = redis.Redis.from_url(redis_server.url, protocol=protocol)
    a, b = f"{keys.prefix}:a", f"{keys.prefix}:b"
    client.xadd(a, {"m": "1"}, id="5-1")
    client.xadd(a, {"m": "2"}, id="6-1")
    client.xadd(b, {"m": "3"}, id="7-1")
    assert last_ids(client.xread({a: "0-0", b: "7-1"})) == {a: "6-1"}
    assert last_ids(client.xread({a: "0-0", b: "0-0"}, count=1)) == {a: "5-1", b: "7-1"}
    assert last_ids(client.xread({a: "6-1", b: "7-1"})) == {}
    client.close()
