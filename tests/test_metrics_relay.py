"""duoserve.metrics_relay: a pair pod's loopback /metrics endpoints served as one scrape on the pod's
address, labelled by process as the gateway's /metrics labels them; real metrics servers, no fakes."""
from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from duoserve import metrics_relay
from services.common.metrics_http import MetricsServer


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_relay_labels_every_peer_and_says_which_answered() -> None:
    servers = []
    for name, count in (("arena", 1), ("decode", 5)):
        registry = CollectorRegistry()
        Counter("duoserve:things", f"Things of {name}", registry=registry).inc(count)
        servers.append(MetricsServer(0, registry))
    gone = _free_port()                          # a worker mid-succession: nothing listens
    config = metrics_relay.parse_args(["--listen", "127.0.0.1:0", "--peer", f"arena=127.0.0.1:{servers[0].port}",
                                       "--peer", f"decode=127.0.0.1:{servers[1].port}",
                                       "--peer", f"prefill=127.0.0.1:{gone}"])
    relay = metrics_relay.serve(config)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        status, body = _get(relay.server_port, "/metrics")
        assert status == 200
        assert 'duoserve:things_total{process="arena"} 1.0' in body
        assert 'duoserve:things_total{process="decode"} 5.0' in body
        assert body.count("# TYPE duoserve:things_total counter") == 1      # one family, a series per process
        for process, up in (("arena", 1.0), ("decode", 1.0), ("prefill", 0.0)):
            assert f'duoserve:scrape_up{{process="{process}"}} {up}' in body
        assert 'process="gateway"' not in body                            # the relay has no series of its own
        status, body = _get(relay.server_port, "/v1/models")
        assert status == 404 and "duoserve:" not in body
    finally:
        relay.shutdown()
        relay.server_close()
        for server in servers:
            server.close()


@pytest.mark.parametrize("argv, message", [
    (["--listen", "0.0.0.0"], "expected HOST:PORT"),
    (["--listen", "0.0.0.0:9100", "--peer", "127.0.0.1:9160"], "expected NAME=HOST:PORT"),
])
def test_bad_arguments_are_refused(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        metrics_relay.parse_args(argv)
    assert message in capsys.readouterr().err


def test_peer_names_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        metrics_relay.parse_args(["--listen", "0.0.0.0:9100", "--peer", "a=h:1", "--peer", "a=h:2"])
