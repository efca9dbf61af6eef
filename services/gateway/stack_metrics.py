"""The stack's metrics in one scrape: the gateway's own registry plus every other process's /metrics.

Each process of the stack serves its own Prometheus registry on its own loopback port; the gateway
is told those endpoints (`--peer-metrics NAME=HOST:PORT`, which `duoserve up` fills from its plan) and
the HTTP API's `/metrics` fetches them all at each scrape. Every series gains a `process` label (the
gateway's own: `process="gateway"`), so the same family from two processes (prefill's and decode's
`duoserve:iteration_seconds`) stays two series under one HELP/TYPE. `duoserve:scrape_up{process}`
says which endpoints answered (1) or not (0): a worker in the middle of a succession may not.
"""
from __future__ import annotations

import asyncio
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 8 << 20
OWN = "gateway"                 # the process label of the gateway's own series


async def fetch(target: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """GET http://target/metrics with HTTP/1.0 (the body ends at EOF); raises OSError on any failure."""
    host, _, port = target.rpartition(":")

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET /metrics HTTP/1.0\r\nHost: {target}\r\nAccept: text/plain\r\n\r\n".encode())
            await writer.drain()
            data = bytearray()
            while len(data) <= MAX_BODY_BYTES and (part := await reader.read(1 << 16)):   # to EOF
                data += part
            return bytes(data)
        finally:
            writer.close()

    try:
        raw = await asyncio.wait_for(get(), timeout_s)
    except asyncio.TimeoutError:
        raise OSError(f"{target}: no answer in {timeout_s:g} s") from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200":
        raise OSError(f"{target}: {head[:80]!r}")
    return body.decode("utf-8", errors="replace")


def _labelled(families: Iterable[Metric], process: str) -> list[Metric]:
    out = []
    for family in families:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [s._replace(labels={**s.labels, "process": process}) for s in family.samples]
        out.append(copy)
    return out


class _Merged:
    """A collector over already-collected families (what generate_latest needs)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(scraped: dict[str, str | None]) -> bytes:
    """One exposition of every process's text (None: did not answer): families merged by name (a
    family whose type differs from the first seen is dropped for that process), each sample labelled
    with its process. All go through the same text parser, so families come out split the same way
    (a counter's `_created` is a gauge family of its own there)."""
    by_name: dict[str, Metric] = {}
    up = GaugeMetricFamily("duoserve:scrape_up", "Whether the gateway's /metrics reached the process (1) or not (0)",
                           labels=["process"])
    groups = []
    for process, text in scraped.items():
        try:
            groups.append((process, list(text_string_to_metric_families(text or ""))))
        except ValueError:                        # not Prometheus text
            text = None
        if process != OWN:
            up.add_metric([process], 0.0 if text is None else 1.0)
    for process, families in groups:
        for family in _labelled(families, process):
            seen = by_name.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                          family.unit))
            if seen.type == family.type:
                seen.samples += family.samples
    return generate_latest(_Merged([*by_name.values(), up]))


async def render(registry: CollectorRegistry, peers: tuple[tuple[str, str], ...]) -> bytes:
    """The gateway's registry and every peer's metrics, fetched concurrently; a peer that fails is
    left out (its scrape_up is 0)."""
    results = await asyncio.gather(*(fetch(target) for _, target in peers), return_exceptions=True)
    scraped = {OWN: generate_latest(registry).decode()}
    scraped.update((name, None if isinstance(r, BaseException) else r) for (name, _), r in zip(peers, results))
    return merge(scraped)
