"""start_redis_server: a private server on a free loopback port, stopped cleanly."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import redis

from services.common.redis_server import RedisServerError, find_redis_server, start_redis_server


def _port_is_free(port: int) -> bool:
    """Nothing listens and a server could bind it (SO_REUSEADDR, as servers do: the closed
    connections linger in TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_find_redis_server_is_an_executable():
    path = find_redis_server()
    assert path.is_file() and os.access(path, os.X_OK)


def test_start_answers_and_stop_frees_the_port(tmp_path: Path):
    server = start_redis_server(tmp_path)
    assert server.url == f"redis://127.0.0.1:{server.port}/0" and server.port != 6379
    client = redis.Redis.from_url(server.url)
    assert client.ping()
    assert int(client.info("server")["process_id"]) == server.pid
    assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
    assert (tmp_path / "redis.pid").read_text().strip() == str(server.pid)
    client.close()
    server.stop()
    assert server.process.returncode is not None and not server.is_running()
    assert _port_is_free(server.port)
    server.stop()                               # twice is harmless
    with start_redis_server(tmp_path, port=server.port) as again:    # same dir and port: starts again
        assert again.port == server.port and again.pid != server.pid


def test_two_servers_at_once_are_independent(tmp_path: Path):
    with start_redis_server(tmp_path / "a") as a, start_redis_server(tmp_path / "b") as b:
        assert a.port != b.port
        ca, cb = redis.Redis.from_url(a.url), redis.Redis.from_url(b.url)
        ca.set("k", "a")
        assert cb.get("k") is None
        ca.close(), cb.close()
    assert not a.is_running() and not b.is_running()


def test_appendonly_option(tmp_path: Path):
    with start_redis_server(tmp_path, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.close()


def test_a_busy_port_fails_with_the_log_tail(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RedisServerError, match="(?s)exited with code.*in use"):
            start_redis_server(tmp_path, port=taken.getsockname()[1], timeout_s=5)


def test_a_missing_binary_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        start_redis_server(tmp_path, binary=tmp_path / "no-such-redis-server")


def test_a_port_held_by_another_redis_is_refused_and_that_redis_survives(redis_server, tmp_path: Path):
    with pytest.raises(RedisServerError):
        start_redis_server(tmp_path, port=redis_server.port, timeout_s=5)
    client = redis.Redis.from_url(redis_server.url)
    assert client.ping() and int(client.info("server")["process_id"]) == redis_server.pid
    client.close()
