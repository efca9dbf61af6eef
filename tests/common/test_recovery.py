"""Taking over a dead worker's pending entries, against a real redis-server: who counts as dead, what
is claimed, and that the dead consumer leaves the group."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from services.common.contracts import QueuedRequest
from services.common.redis_queues import enqueue, ensure_group, group_consumers, read_group
from services.engine.sampling_params import SamplingParams
from services.worker.recovery import heartbeat_value, is_dead, read_progress, take_over_dead

GROUP = "prefill"


def _request(request_id: str) -> QueuedRequest:
    return QueuedRequest(request_id, (1, 2, 3), SamplingParams(max_tokens=4), "reply", 0.0)


def _heartbeat_of_an_exited_process() -> str:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    value = heartbeat_value(child.pid)                              # written while it lived
    child.kill()
    child.wait()
    return value


def test_who_is_dead():
    me = heartbeat_value()
    assert not is_dead(me) and not is_dead(me.encode())
    assert is_dead(None)                                            # expired, or never written
    assert is_dead(_heartbeat_of_an_exited_process())                  # a gone process on this host
    host, pid, start = me.split()
    assert is_dead(f"{host} {pid} {int(start) + 1}")                # the pid reused by another process
    assert not is_dead(f"some-other-host {pid} 1")                  # elsewhere: alive until it expires
    assert host == socket.gethostname()


def test_a_dead_consumers_entries_are_claimed_and_it_leaves_the_group(redis_client, keys):
    stream = keys.prefill_queue
    ensure_group(redis_client, stream, GROUP)
    ids = [enqueue(redis_client, stream, _request(f"r{i}")) for i in range(5)]
    read_group(redis_client, stream, GROUP, "dead", QueuedRequest, count=3)      # r0-r2 pending with it
    read_group(redis_client, stream, GROUP, "alive", QueuedRequest, count=1)     # r3 with a live one
    redis_client.set(keys.worker_alive("dead"), _heartbeat_of_an_exited_process())
    redis_client.set(keys.worker_alive("alive"), heartbeat_value(os.getpid()))
    taken = take_over_dead(redis_client, keys.worker_alive, stream, GROUP, "me", QueuedRequest)
    assert [(entry_id, q.request_id) for entry_id, q in taken] == list(zip(ids[:3], ("r0", "r1", "r2")))
    consumers = dict(group_consumers(redis_client, stream, GROUP))
    assert consumers == {"alive": 1, "me": 3}                       # still pending: acked once handled
    assert take_over_dead(redis_client, keys.worker_alive, stream, GROUP, "me", QueuedRequest) == []
    redis_client.delete(keys.worker_alive("alive"))                 # its heartbeat expired
    taken = take_over_dead(redis_client, keys.worker_alive, stream, GROUP, "me", QueuedRequest)
    assert [q.request_id for _, q in taken] == ["r3"]
    assert read_group(redis_client, stream, GROUP, "me", QueuedRequest, count=5) == [(ids[4], _request("r4"))]


def test_progress_is_read_back_per_request_in_order(redis_client, keys):
    redis_client.rpush(keys.decode_progress("a"), 5, 7, 9)
    redis_client.rpush(keys.decode_progress("c"), 11)
    assert read_progress(redis_client, keys, ["a", "b", "c"]) == [(5, 7, 9), (), (11,)]   # b: none delivered yet
    assert read_progress(redis_client, keys, []) == []
