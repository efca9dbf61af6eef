"""Prometheus metrics of a worker, named like vLLM's with a `duoserve:` prefix and labelled, as vLLM's
are, with the served model's name (`model_name`), plus the worker's `phase`.

Each process builds its own registry (no module-level collectors) and serves it on its own port
(`/metrics` only: services/common/metrics_http.py).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from services.common.metrics_http import MetricsServer, serve_metrics

SWITCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
HOST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)
LABELS = ("model_name", "phase")
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class WorkerMetrics:
    def __init__(self, phase: str, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "phase": phase}
        r = self.registry
        self.num_requests_running = Gauge("duoserve:num_requests_running", "Requests in the running batch",
                                          labelnames=LABELS, registry=r).labels(**labels)
        self.num_requests_waiting = Gauge("duoserve:num_requests_waiting", "Requests taken but not yet scheduled",
                                          labelnames=LABELS, registry=r).labels(**labels)
        self.kv_cache_usage_perc = Gauge("duoserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)",
                                         labelnames=LABELS, registry=r).labels(**labels)
        self.compute_share = Gauge("duoserve:compute_share", "Fraction of the device this worker may use",
                                   labelnames=LABELS, registry=r).labels(**labels)
        self.prompt_tokens = Counter("duoserve:prompt_tokens", "Prompt tokens prefilled",
                                     labelnames=LABELS, registry=r).labels(**labels)
        self.generation_tokens = Counter("duoserve:generation_tokens", "Tokens generated",
                                         labelnames=LABELS, registry=r).labels(**labels)
        self.num_preemptions = Counter("duoserve:num_preemptions", "Requests preempted for lack of KV blocks",
                                       labelnames=LABELS, registry=r).labels(**labels)
        self.iteration_seconds = Histogram("duoserve:iteration_seconds", "Wall time of one engine iteration",
                                           labelnames=LABELS, buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.iteration_host_seconds = Histogram(
            "duoserve:iteration_host_seconds", "Wall time of one iteration outside the model's forward pass "
            "(Redis, scheduling, input tensors, sampling, publishing)", labelnames=LABELS,
            buckets=HOST_BUCKETS, registry=r).labels(**labels)
        self.handoff_latency_seconds = Histogram(
            "duoserve:handoff_latency_seconds", "Prefill done (hand-off published) to first decode iteration",
            labelnames=LABELS, buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.share_switch_seconds = Histogram(
            "duoserve:share_switch_seconds", "Retune by succession: SetComputeShare call to the successor's first "
            "iteration", labelnames=LABELS, buckets=SWITCH_BUCKETS, registry=r).labels(**labels)
        self._server: MetricsServer | None = None
        self._labels = labels

    def read_when_scraped(self, num_running: Callable[[], int], num_waiting: Callable[[], int],
                          kv_usage: Callable[[], float]) -> None:
        """The state gauges are read at each scrape, not set per iteration: a request that leaves
        (finished or cancelled) leaves them at once, also while the loop idles with nothing to run."""
        self.num_requests_running.set_function(num_running)
        self.num_requests_waiting.set_function(num_waiting)
        self.kv_cache_usage_perc.set_function(kv_usage)

    def read_prefix_cache(self, queries: Callable[[], int], hits: Callable[[], int]) -> None:
        """vLLM's prefix-cache counters, in tokens, read at each scrape from the scheduler's counts:
        `duoserve:prefix_cache_queries_total` (tokens of admissions that looked the cache up) and
        `duoserve:prefix_cache_hits_total` (of those, found cached); hit rate = hits / queries."""
        labels = self._labels

        class PrefixCacheCollector:
            def collect(self):
                for name, doc, read in (("duoserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queries),
                                        ("duoserve:prefix_cache_hits", "Of those, tokens found cached", hits)):
                    family = CounterMetricFamily(name, doc, labels=list(labels))
                    family.add_metric(list(labels.values()), read())
                    yield family

        self.registry.register(PrefixCacheCollector())

    def serve(self, port: int) -> None:
        self._server = serve_metrics(port, self.registry)

    def close(self) -> None:
        """Release the port (a retune by succession: the successor serves it next)."""
        if self._server is not None:
            self._server.close()
            self._server = None
