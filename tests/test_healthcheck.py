"""`python -m duoserve.healthcheck`, the containers' health probe, against a real grpc.health.v1 server."""
from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def health_server():
    """A gRPC server on a free loopback port with the standard health servicer; yields (target, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, server
    finally:
        server.stop(0)


def probe(target: str) -> subprocess.CompletedProcess:
    """The probe exactly as docker-compose.yml runs it: a fresh interpreter, `-m duoserve.healthcheck`."""
    return subprocess.run([sys.executable, "-m", "duoserve.healthcheck", target, "--timeout", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_serving_exits_0_then_not_serving_and_gone_exit_1(health_server) -> None:
    target, servicer, server = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ok = probe(target)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""

    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)      # a process still loading its model
    loading = probe(target)
    assert loading.returncode == 1
    assert f"{target}: NOT_SERVING" in loading.stderr

    server.stop(0).wait()                                              # the process is gone
    gone = probe(target)
    assert gone.returncode == 1
    assert f"{target}: UNREACHABLE" in gone.stderr

