"""The metrics servers of every process: `/metrics` answers, any other path is 404 (prometheus_client's
own server answered every path with the metrics)."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.common.metrics_http import MetricsServer, serve_metrics
from services.gateway.metrics import GatewayMetrics
from services.worker.metrics import WorkerMetrics


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_only_metrics_is_served() -> None:
    registry = CollectorRegistry()
    Counter("duoserve:things", "Things", registry=registry).inc(3)
    server = MetricsServer(0, registry)
    try:
        status, body = _get(server.port, "/metrics")
        assert status == 200 and "duoserve:things_total 3.0" in body
        for path in ("/v1/models", "/", "/metrics/extra", "/health"):
            status, body = _get(server.port, path)
            assert status == 404 and "duoserve:" not in body, path
    finally:
        server.close()
    with pytest.raises(urllib.error.URLError):      # closed: the port is released (a succession rebinds it)
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_port_zero_serves_nothing() -> None:
    assert serve_metrics(0, CollectorRegistry()) is None


def test_worker_and_gateway_series_carry_the_model_name() -> None:
    worker = WorkerMetrics("decode", model_name="smollm2-135m-instruct")
    running = [2]
    worker.read_when_scraped(lambda: running[0], lambda: 1, lambda: 0.25)
    worker.generation_tokens.inc(5)
    gateway = GatewayMetrics()
    gateway.bind_model("smollm2-135m-instruct")
    gateway.observe_finished(7, 3, 0.5, "abort")
    servers = [MetricsServer(0, worker.registry), MetricsServer(0, gateway.registry)]
    try:
        labels = 'model_name="smollm2-135m-instruct",phase="decode"'
        text = _get(servers[0].port, "/metrics")[1]
        assert f"duoserve:generation_tokens_total{{{labels}}} 5.0" in text
        assert f"duoserve:num_requests_running{{{labels}}} 2.0" in text
        assert f"duoserve:kv_cache_usage_perc{{{labels}}} 0.25" in text
        running[0] = 0                                  # a request left: the next scrape says so
        assert f"duoserve:num_requests_running{{{labels}}} 0.0" in _get(servers[0].port, "/metrics")[1]
        text = _get(servers[1].port, "/metrics")[1]
        for reason, count in (("stop", 0), ("length", 0), ("abort", 1), ("error", 0)):   # vLLM's reasons
            assert (f'duoserve:request_success_total{{finished_reason="{reason}",'
                    f'model_name="smollm2-135m-instruct"}} {count:.1f}') in text
        assert 'duoserve:generation_tokens_total{model_name="smollm2-135m-instruct"} 3.0' in text
    finally:
        for server in servers:
            server.close()
