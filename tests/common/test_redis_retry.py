"""Going on through a Redis restart (services/common/redis_retry.py), against real redis-servers that
are killed with SIGKILL and started again on the same port: with the append-only file nothing
acknowledged is lost and the data epoch stays; without it the epoch tells that the data is gone."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from services.common import redis_retry
from services.common.redis_retry import Backoff, DataEpoch, Outage, wait_until_up
from services.common.redis_server import RedisServerProcess, start_redis_server


def test_backoff_doubles_up_to_its_cap_within_its_jitter():
    backoff = Backoff(base_s=0.05, cap_s=1.0, jitter=0.2)
    delays = [backoff.next() for _ in range(10)]
    for i, delay in enumerate(delays):
        nominal = min(1.0, 0.05 * 2 ** i)
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    backoff.reset()
    assert backoff.next() <= 0.06


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog):
    log = logging.getLogger("test.outage")
    outage = Outage(log, "waiting")
    assert outage.back() == 0.0 and not caplog.records          # never went: nothing to say
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        for _ in range(5):
            outage.lost(redis.ConnectionError("refused"))
        assert outage.is_down
        assert outage.back("resumed") >= 0.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("redis unreachable (ConnectionError: refused); waiting")
    assert lines[1].startswith("redis back after") and lines[1].endswith("; resumed")


def _kill(server: RedisServerProcess) -> None:
    server.process.kill()
    server.process.wait()


@pytest.fixture
def aof_server(tmp_path):
    servers = [start_redis_server(tmp_path, appendonly=True)]
    yield servers
    for server in servers:
        server.stop()


def test_a_killed_redis_back_from_its_append_only_file_has_everything_it_acknowledged(aof_server):
    server = aof_server[0]
    client = redis_retry.client(server.url)
    epoch = DataEpoch("t:epoch")
    assert epoch.rejoin(client) is False                      # the first look sets it
    for i in range(2000):                                     # acknowledged one by one, no pause
        client.xadd("t:s", {"i": i})
        client.eval("return redis.call('RPUSH', KEYS[1], ARGV[1])", 1, "t:l", i)
    with client.pipeline(transaction=True) as pipe:
        pipe.incr("t:n").lpush("t:l2", 1).execute()
    _kill(server)                                             # right after: nothing had time to fsync
    with pytest.raises(redis.ConnectionError):
        client.ping()                                         # refused at once: no retry behind our back
    restarted = threading.Thread(target=lambda: aof_server.append(
        start_redis_server(server.dir, server.port, appendonly=True)))
    threading.Timer(0.3, restarted.start).start()
    started = time.monotonic()
    assert wait_until_up(client, lambda delay: time.sleep(delay) or False)
    assert time.monotonic() - started >= 0.25
    assert client.xlen("t:s") == 2000 and client.llen("t:l") == 2000
    assert client.get("t:n") == b"1" and client.llen("t:l2") == 1
    assert epoch.rejoin(client) is False                      # the same data set


def test_wait_until_up_gives_up_when_told_to_stop(tmp_path):
    client = redis_retry.client("redis://127.0.0.1:1/0")      # nothing listens there
    calls: list[float] = []
    assert wait_until_up(client, lambda delay: calls.append(delay) or len(calls) >= 3) is False
    assert len(calls) == 3 and calls[0] < calls[2]


def test_a_redis_that_came_back_empty_is_told_by_the_epoch_to_every_process(tmp_path):
    server = start_redis_server(tmp_path)                     # no append-only file
    try:
        mine, theirs = DataEpoch("t:epoch"), DataEpoch("t:epoch")
        client = redis_retry.client(server.url)
        assert mine.rejoin(client) is False and theirs.rejoin(client) is False
        _kill(server)
        server = start_redis_server(tmp_path, server.port)
        assert mine.rejoin(client) is True                    # sets a new token: not the one it knew
        assert theirs.rejoin(client) is True                  # finds that new token: not the one it knew
        assert mine.rejoin(client) is False and theirs.rejoin(client) is False
    finally:
        server.stop()
