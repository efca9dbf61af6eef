"""Every stream's entries as each writer writes them (services/common/stream_entries.py), against a
real redis-server: what a writer adds, its reader gets back; and the orchestrator sees a request that
a preempting decode worker re-queued, as it sees the gateway's."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from orchestrator.redis_state import RedisState, Waiting
from services.common import stream_entries
from services.common.contracts import (CancelNotice, Handoff, IterationSample, QueuedRequest, RequestLatency,
                                       TokenDelivery, TokenLogprob, WorkerReport)
from services.common.redis_blocks import RedisBlockAllocator
from services.common.redis_queues import enqueue, ensure_group, read_group
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerMode
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import Sequence
from services.worker.config import Phase, WorkerConfig
from services.worker.control import ShareState, WorkerControl
from services.worker.loop import Worker
from services.worker.metrics import WorkerMetrics
from services.worker.tracked import TrackedRequest

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, stop=("x",), logprobs=1)


def _tracked(request_id: str = "r1", prompt: int = 5, output: int = 3) -> TrackedRequest:
    seq = Sequence(request_id, list(range(1, prompt + 1)), PARAMS, arrival_time=1700000000.25,
                   output_token_ids=list(range(100, 100 + output)), num_computed_tokens=prompt + output - 1)
    return TrackedRequest(seq, "duo:reply:g1", "1-0")


def _added(client: redis.Redis, entry: stream_entries.Entry) -> dict:
    """Add `entry` as the writers do, and return its fields as a reader gets them."""
    entry_id = stream_entries.add(client, entry)
    ((got_id, fields),) = client.xrange(entry.stream, entry_id, entry_id)
    return fields


def test_each_message_round_trips_through_its_stream(redis_client, keys):
    tracked = _tracked()
    handoff = tracked.handoff()
    delivery = TokenDelivery("r1", (7,), None, queue_time_ms=3.5, logprobs=(TokenLogprob(7, -0.5, ((7, -0.5),)),),
                             position=2)
    sample = IterationSample("decode", 0.5, 1, 0, 4, 4, 64, 0, 2.5, 3.0)
    report = WorkerReport("decode", "decode-1", "127.0.0.1:1", 0.5, (0,), 0, 1, 0, 10, 5, 8, 2.0)
    cases = [
        (stream_entries.queued(keys, tracked.requeued()), tracked.requeued()),
        (stream_entries.handoff(keys, handoff), handoff),
        (stream_entries.cancel(keys, CancelNotice("r1", "stop")), CancelNotice("r1", "stop")),
        (stream_entries.timing(keys, sample), sample),
        (stream_entries.latency(keys, RequestLatency(10.0, 2.0, 5, 3, 4.0)), RequestLatency(10.0, 2.0, 5, 3, 4.0)),
    ]
    for entry, expected in cases:
        assert stream_entries.read(type(expected), _added(redis_client, entry)) == expected
    reply = _added(redis_client, stream_entries.deliveries(keys.reply("g1"), (delivery, delivery)))
    assert stream_entries.read_deliveries(reply) == (delivery, delivery)
    redis_client.hset(keys.worker_stats("decode"), mapping=stream_entries.report_mapping(report))
    assert stream_entries.read_report(redis_client.hget(keys.worker_stats("decode"), stream_entries.FIELD)) == report
    assert {e.stream for e, _ in cases if e.maxlen} == {keys.cancel, keys.timings, keys.latencies}   # capped


def test_every_prefill_queue_writer_writes_the_fields_the_orchestrator_reads(redis_server, redis_client, keys):
    """The gateway's (asyncio), a re-queue's (a transaction pipeline) and `enqueue`'s entries alike."""
    new = QueuedRequest("g1", (1, 2, 3, 4), PARAMS, "duo:reply:g1", 1700000000.5)

    async def gateway() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await stream_entries.add(client, stream_entries.queued(keys, new))
        finally:
            await client.aclose()

    asyncio.run(gateway())
    pipe = redis_client.pipeline(transaction=True)
    stream_entries.add(pipe, stream_entries.queued(keys, _tracked("p1").requeued()))
    pipe.execute()
    enqueue(redis_client, keys.prefill_queue, _tracked("e1", prompt=2, output=0).requeued())
    entries = redis_client.xrange(keys.prefill_queue)
    assert [stream_entries.read_waiting(fields) for _, fields in entries] == [
        (1700000000.5, 4), (1700000000.25, 8), (1700000000.25, 2)]        # prompt + tokens to recompute
    assert [stream_entries.read(QueuedRequest, f).request_id for _, f in entries] == ["g1", "p1", "e1"]
    assert RedisState(redis_client, keys).snapshot().waiting == (
        Waiting(1700000000.5, 4), Waiting(1700000000.25, 8), Waiting(1700000000.25, 2))


def test_a_bad_entry_is_an_entry_error_naming_what_is_wrong():
    with pytest.raises(stream_entries.EntryError, match="no 'm' field"):
        stream_entries.read(QueuedRequest, {b"other": b"1"})
    with pytest.raises(stream_entries.EntryError, match="not a QueuedRequest"):
        stream_entries.read(QueuedRequest, {b"m": b"{not json"})
    with pytest.raises(stream_entries.EntryError, match="no 't' field"):
        stream_entries.read_waiting({b"m": b"{}"})
    with pytest.raises(stream_entries.EntryError, match="not a TokenDeliveries"):
        stream_entries.read_deliveries({"m": "[]"})


def _decode_worker(redis_url: str, keys, num_blocks: int) -> Worker:
    """A real decode worker's loop over real Redis; the model is never run here (runner None): only
    admission, scheduling and the re-queue of what it preempts."""
    client = redis.Redis.from_url(redis_url)
    blocks = RedisBlockAllocator(client, keys)
    blocks.init_pool(num_blocks, 16)
    config = WorkerConfig(phase=Phase.DECODE, redis_url=redis_url, key_prefix=keys.prefix, port=1, metrics_port=0,
                          arena_socket=Path("/nonexistent"), model=None, cache_dir=Path("/nonexistent"),
                          worker_id="decode-test", overlap_publish=False, idle_block_ms=1)
    scheduler = Scheduler(SchedulerConfig(mode=SchedulerMode.DECODE, block_size=16), blocks)
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    return Worker(config, scheduler, None, Sampler(), client, WorkerControl(ShareState(1.0, cpus, 0)),
                  WorkerMetrics("decode", "test"), stack_cpus=cpus)


def test_the_orchestrator_sees_a_request_that_decode_preempted(redis_server, redis_client, keys):
    """Two requests fill a two-block pool; the next token of the older needs a block: decode preempts
    the newer and re-queues it to prefill, where the orchestrator's snapshot counts it."""
    worker = _decode_worker(redis_server.url, keys, num_blocks=2)
    try:
        for i, request_id in enumerate(("old", "new")):
            block_ids = tuple(worker.scheduler.blocks.allocate(request_id, 1))
            handoff = Handoff(request_id, block_ids, tuple(range(1, 17)), (500 + i,), 16, PARAMS, keys.reply("g1"),
                              1700000000.0 + i, time.time())
            stream_entries.add(redis_client, stream_entries.handoff(keys, handoff))
        worker._poll_inputs()
        assert sorted(worker.tracked) == ["new", "old"]
        batch = worker.scheduler.schedule()                    # as run_once: schedule, then re-queue
        worker._requeue_preempted(batch)
        assert batch.preempted_ids == ("new",) and list(worker.tracked) == ["old"]
        assert RedisState(redis_client, keys).snapshot().waiting == (Waiting(1700000001.0, 17),)
        ensure_group(redis_client, keys.prefill_queue, "prefill")
        ((_, queued),) = read_group(redis_client, keys.prefill_queue, "prefill", "p", QueuedRequest, count=5)
        assert queued == QueuedRequest("new", tuple(range(1, 17)), PARAMS, keys.reply("g1"), 1700000001.0, (501,))
    finally:
        worker.publisher.close()
        worker.inputs.close()
        worker.client.close()
