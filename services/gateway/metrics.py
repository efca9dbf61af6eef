"""The gateway's Prometheus metrics: request latencies as clients see them, named like vLLM's."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.worker.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.num_requests_running = Gauge("duoserve:num_requests_running",
                                          "Requests past their first token, streaming", registry=r)
        self.num_requests_waiting = Gauge("duoserve:num_requests_waiting",
                                          "Requests accepted, waiting for their first token", registry=r)
        self.time_to_first_token = Histogram("duoserve:time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("duoserve:inter_token_latency_seconds", "Time between tokens",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("duoserve:e2e_request_latency_seconds", "Arrival to last token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("duoserve:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("duoserve:generation_tokens", "Tokens sent to clients", registry=r)
        self.request_success = Counter("duoserve:request_success", "Finished requests by finish reason",
                                       labelnames=["finished_reason"], registry=r)

    def observe_finished(self, num_prompt: int, num_completion: int, e2e_s: float, finish_reason: str) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_completion)
        self.e2e_request_latency.observe(e2e_s)
        self.request_success.labels(finished_reason=finish_reason).inc()

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, addr="127.0.0.1", registry=self.registry)
