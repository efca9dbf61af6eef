"""The gateway's Prometheus metrics: request latencies as clients see them, named like vLLM's.

Every series carries the served model's name (`model_name`), as vLLM's do. The gateway learns it
from the stack's model info after start-up (`bind_model`, in `Frontend.wait_for_model`); until then
it serves no request, and the series have no samples. `request_success` counts every request that
was queued, by vLLM's finish reasons: stop, length, abort (the client went away or its deadline
passed) and error.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics_http import serve_metrics
from services.worker.metrics import LATENCY_BUCKETS

FINISHED_REASONS = ("stop", "length", "abort", "error")    # vLLM's request_success_total label values


class GatewayMetrics:
    def __init__(self, model_name: str | None = None) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self._running = Gauge("duoserve:num_requests_running", "Requests past their first token, streaming",
                              labelnames=m, registry=r)
        self._waiting = Gauge("duoserve:num_requests_waiting", "Requests accepted, waiting for their first token",
                              labelnames=m, registry=r)
        self._ttft = Histogram("duoserve:time_to_first_token_seconds", "Arrival to first token",
                               labelnames=m, buckets=LATENCY_BUCKETS, registry=r)
        self._itl = Histogram("duoserve:inter_token_latency_seconds", "Time between tokens",
                              labelnames=m, buckets=LATENCY_BUCKETS, registry=r)
        self._e2e = Histogram("duoserve:e2e_request_latency_seconds", "Arrival to last token (or to the abort)",
                              labelnames=m, buckets=LATENCY_BUCKETS, registry=r)
        self._prompt = Counter("duoserve:prompt_tokens", "Prompt tokens of finished requests",
                               labelnames=m, registry=r)
        self._generation = Counter("duoserve:generation_tokens", "Tokens sent to clients", labelnames=m, registry=r)
        self._success = Counter("duoserve:request_success", "Finished requests by finish reason",
                                labelnames=m + ["finished_reason"], registry=r)
        self._routed = Counter("duoserve:pair_requests_routed", "Requests sent to each pair (a resend counts again)",
                               labelnames=m + ["pair"], registry=r)
        self._resent = Counter("duoserve:pair_requests_resent", "Requests sent again because their pair died, by the "
                               "pair they left", labelnames=m + ["pair"], registry=r)
        self._pair_alive = Gauge("duoserve:pair_alive", "1 while routing sees the pair alive (both workers report)",
                                 labelnames=m + ["pair"], registry=r)
        self.model_name: str | None = None
        if model_name is not None:
            self.bind_model(model_name)

    def bind_model(self, model_name: str) -> None:
        """Label every series with the served model's name; the attributes below exist from here on."""
        self.model_name = model_name
        self.num_requests_running = self._running.labels(model_name)
        self.num_requests_waiting = self._waiting.labels(model_name)
        self.time_to_first_token = self._ttft.labels(model_name)
        self.inter_token_latency = self._itl.labels(model_name)
        self.e2e_request_latency = self._e2e.labels(model_name)
        self.prompt_tokens = self._prompt.labels(model_name)
        self.generation_tokens = self._generation.labels(model_name)
        for reason in FINISHED_REASONS:      # every reason exported from the start, at 0 (as vLLM does)
            self._success.labels(model_name, reason)

    def observe_finished(self, num_prompt: int, num_completion: int, e2e_s: float, finish_reason: str) -> None:
        self.prompt_tokens.inc(num_prompt)
        self.generation_tokens.inc(num_completion)
        self.e2e_request_latency.observe(e2e_s)
        self._success.labels(self.model_name, finish_reason).inc()

    def routed(self, pair: str) -> None:
        self._routed.labels(self.model_name, pair).inc()

    def resent(self, from_pair: str) -> None:
        self._resent.labels(self.model_name, from_pair).inc()

    def pair_alive(self, pair: str, alive: bool) -> None:
        self._pair_alive.labels(self.model_name, pair).set(1 if alive else 0)

    def serve(self, port: int) -> None:
        serve_metrics(port, self.registry)
