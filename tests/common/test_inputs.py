"""A worker's input reads against a real redis-server: the first poll reads, a busy worker with
nothing new reads nothing (no XREADGROUP sent), and a new entry or cancel is read at the next poll."""
from __future__ import annotations

import time

from services.common.contracts import CancelNotice, QueuedRequest
from services.common.redis_blocks import RedisBlockAllocator
from services.common.redis_queues import enqueue, ensure_group
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerMode
from services.engine.sequence import Sequence
from services.worker.inputs import InputReader, InputStream
from services.worker.publisher import PipelinePublisher


def _request(request_id: str) -> QueuedRequest:
    return QueuedRequest(request_id, (1, 2, 3), SamplingParams(max_tokens=4), "reply", 0.0)


def _xreadgroup_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_xreadgroup", {}).get("calls", 0))


def _poll_until(reader: InputReader, room: int, done, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reads = reader.poll(room)
        if done(reads):
            return reads
        time.sleep(0.02)
    raise AssertionError("nothing read in time")


def test_a_busy_reader_reads_only_when_something_arrived(redis_client, keys):
    stream = keys.prefill_queue
    ensure_group(redis_client, stream, "prefill")
    blocks = RedisBlockAllocator(redis_client, keys)
    blocks.init_pool(64, 16)
    scheduler = Scheduler(SchedulerConfig(mode=SchedulerMode.PREFILL), blocks)
    publisher = PipelinePublisher(lambda replies: None)
    enqueue(redis_client, stream, _request("a"))                 # before the reader: its bell starts after it
    reader = InputReader(redis_client, keys, InputStream(stream, "prefill", "w1", QueuedRequest), scheduler,
                         publisher, grows_decode=False, overlapped=True, idle_block_ms=50, name="test")
    try:
        first = reader.poll(room=8)                              # the first poll always reads
        assert [q.request_id for _, q in first.entries] == ["a"] and not first.blocked
        scheduler.add(Sequence("a", [1, 2, 3], SamplingParams(max_tokens=4)))     # busy from here
        time.sleep(0.3)
        reader.poll(room=7)                                      # an entry may ring once after it was read
        before = _xreadgroup_calls(redis_client)
        assert reader.poll(room=7).entries == [] and _xreadgroup_calls(redis_client) == before
        enqueue(redis_client, stream, _request("b"))
        reads = _poll_until(reader, 7, lambda r: r.entries)
        assert [q.request_id for _, q in reads.entries] == ["b"]
        enqueue(redis_client, keys.cancel, CancelNotice("a", "cancelled"))
        assert _poll_until(reader, 6, lambda r: r.cancelled).cancelled == {"a"}
    finally:
        reader.close()
        publisher.close()
