"""`python -m duoserve.metrics_relay --listen HOST:PORT --peer NAME=HOST:PORT ...`: a pod's metrics in one scrape.

Every duoserve process serves its Prometheus registry on 127.0.0.1 only (services/common/metrics_http.py),
which a scraper outside the process's network namespace cannot reach. On one machine the gateway's
/metrics fetches them all (`--peer-metrics`); on Kubernetes the pair's processes are in a pod of their
own, so this runs beside them, in the pod's network namespace, and serves on the pod's address what the
gateway serves there: every peer's series labelled `process="<NAME>"` and `duoserve:scrape_up{process}`
(0 for one that did not answer, e.g. a worker mid-succession), by the gateway's own merge
(services/gateway/stack_metrics.py). `/metrics` only; any other path is a 404. Each scrape fetches the
peers afresh (2 s timeout each): it keeps nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.gateway.stack_metrics import render

METRICS_PATH = "/metrics"


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """One relay process."""

    host: str                               # where scrapers reach it (the pod's: 0.0.0.0)
    port: int                               # its HTTP port
    peers: tuple[tuple[str, str], ...]      # (process name, HOST:PORT of its /metrics)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        names = [name for name, _ in self.peers]
        if len(set(names)) != len(names):
            raise ValueError(f"peer names must be distinct, got {names}")


def _target(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not (colon and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _peer(text: str) -> tuple[str, str]:
    name, sep, target = text.partition("=")
    if not (sep and name):
        raise argparse.ArgumentTypeError(f"expected NAME=HOST:PORT, got {text!r}")
    _target(target)
    return name, target


def parse_args(argv: Sequence[str] | None = None) -> RelayConfig:
    p = argparse.ArgumentParser(prog="python -m duoserve.metrics_relay",
                                description="serve the /metrics of this pod's duoserve processes as one scrape")
    p.add_argument("--listen", type=_target, required=True, metavar="HOST:PORT", help="where to serve /metrics")
    p.add_argument("--peer", type=_peer, action="append", default=[], metavar="NAME=HOST:PORT",
                   help="a process's Prometheus endpoint, labelled process=NAME; repeat per process")
    a = p.parse_args(argv)
    return RelayConfig(host=a.listen[0], port=a.listen[1], peers=tuple(a.peer))


def _handler(peers: tuple[tuple[str, str], ...]) -> type[BaseHTTPRequestHandler]:
    empty = CollectorRegistry()                # the relay has no series of its own

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:               # noqa: N802: the base class's name
            if self.path.split("?", 1)[0] not in (METRICS_PATH, METRICS_PATH + "/"):
                self._reply(404, b"not found: metrics are served at /metrics\n", "text/plain; charset=utf-8")
                return
            self._reply(200, asyncio.run(render(empty, peers)), CONTENT_TYPE_LATEST)

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:   # noqa: A002: one line per scrape is noise
            pass

    return Handler


def serve(config: RelayConfig) -> ThreadingHTTPServer:
    """Bind now (a taken port raises here); the caller runs `serve_forever`."""
    server = ThreadingHTTPServer((config.host, config.port), _handler(config.peers))
    server.daemon_threads = True               # a slow scraper never holds the process open
    return server


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    server = serve(config)
    print(f"metrics relay on {config.host}:{server.server_port}{METRICS_PATH} for "
          f"{', '.join(name for name, _ in config.peers) or 'no peers'}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
