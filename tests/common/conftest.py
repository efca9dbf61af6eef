"""A real redis-server for the tests of the Redis helpers: one per session, never the one on 6379."""
from __future__ import annotations

import uuid
from typing import Iterator

import pytest
import redis

from services.common.contracts import KeySpace
from services.common.redis_server import RedisServerProcess, start_redis_server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def keys() -> KeySpace:
    """A prefix of its own per test: tests never see each other's keys."""
    return KeySpace(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
def redis_client(redis_server: RedisServerProcess) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()
