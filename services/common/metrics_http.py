"""The one HTTP server every process uses for its Prometheus metrics: `/metrics` on 127.0.0.1, 404 elsewhere.

prometheus_client's `start_http_server` answers any path with the metrics, so `/v1/models` on a
metrics port looked like a working API. This wraps its WSGI app (content negotiation, gzip,
`name[]` filters unchanged) behind a path check, served from a daemon thread.
"""
from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH = "/metrics"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True        # a slow scraper never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002: the base class's name
        pass                     # one line per scrape on stderr is noise


def _only_metrics(app: Callable) -> Callable:
    def wsgi(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") not in (METRICS_PATH, METRICS_PATH + "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: metrics are served at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)
    return wsgi


class MetricsServer:
    """A registry served at `/metrics`; `close()` releases the port (a retune by succession rebinds it)."""

    def __init__(self, port: int, registry: CollectorRegistry, addr: str = "127.0.0.1") -> None:
        # Binds now: a port in use raises OSError here, in the caller (the supervisor relaunches elsewhere).
        self._httpd = make_server(addr, port, _only_metrics(make_wsgi_app(registry)), _Server,
                                  handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve_metrics(port: int, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve `registry` on 127.0.0.1:`port` (0: not served, as every process's config means it)."""
    return MetricsServer(port, registry) if port else None
