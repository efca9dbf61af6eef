"""Everything the orchestrator knows, read from Redis alone: queue, workers, KV, timings, latencies.

Also where its own state lives so that a restarted orchestrator picks up where it left off: the
SLO, the policy mode and pinned shares (a hash) and the decision history (a capped list).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from services.common import stream_entries
from services.common.contracts import IterationSample, KeySpace, RequestLatency, WorkerReport
from services.common.redis_blocks import free_count_from, queue_free_count

DECISIONS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request in the prefill stream (waiting, or being prefilled)."""

    arrival_time: float        # wall clock at the gateway
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One tick's view of the stack."""

    now: float
    waiting: tuple[Waiting, ...]
    workers: dict[str, WorkerReport]       # by phase
    kv_free_blocks: int
    kv_total_blocks: int


class RedisState:
    def __init__(self, client: redis.Redis, keys: KeySpace) -> None:
        self.client = client
        self.keys = keys
        self._timings_cursor = "$"
        self._latency_cursor = "0-0"

    def snapshot(self, max_waiting: int = 4096) -> Snapshot:
        pipe = self.client.pipeline(transaction=False)
        pipe.xrange(self.keys.prefill_queue, count=max_waiting)
        for phase in ("prefill", "decode", "colocated"):
            pipe.hget(self.keys.worker_stats(phase), stream_entries.FIELD)
        pipe.hget(self.keys.kv_meta, "num_blocks")
        queue_free_count(pipe, self.keys)
        entries, *reports, num_blocks, num_free, num_evictable = pipe.execute()
        num_free = free_count_from((num_free, num_evictable))
        waiting = tuple(Waiting(*w) for w in _waiting(entries))
        workers: dict[str, WorkerReport] = {}
        for phase, raw in zip(("prefill", "decode", "colocated"), reports):
            if raw is not None:
                workers[phase] = stream_entries.read_report(raw)
        return Snapshot(time.time(), waiting, workers, int(num_free or 0), int(num_blocks or 0))

    def new_timings(self, count: int = 2000) -> list[IterationSample]:
        """Iteration samples since the last call (the first call starts from now)."""
        result = self.client.xread({self.keys.timings: self._timings_cursor}, count=count)
        samples = []
        for _stream, entries in result or ():
            for entry_id, fields in entries:
                self._timings_cursor = entry_id
                samples.append(stream_entries.read(IterationSample, fields))
        if self._timings_cursor == "$" and not samples:
            last = self.client.xrevrange(self.keys.timings, count=1)
            self._timings_cursor = last[0][0] if last else "0-0"
        return samples

    def recent_latencies(self, window_s: float, count: int = 5000) -> list[RequestLatency]:
        entries = self.client.xrevrange(self.keys.latencies, count=count)
        cutoff = time.time() - window_s
        latencies = [stream_entries.read(RequestLatency, fields) for _, fields in entries]
        return [lat for lat in latencies if lat.time >= cutoff]

    # ------------------------------------------------------------------ the orchestrator's own state
    def load_settings(self) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.orchestrator_state)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def save_settings(self, **settings: object) -> None:
        self.client.hset(self.keys.orchestrator_state,
                         mapping={k: json.dumps(v) if not isinstance(v, str) else v for k, v in settings.items()})

    def record_decision(self, decision: dict) -> None:
        self.client.pipeline(transaction=False).lpush(self.keys.decisions, json.dumps(decision)) \
            .ltrim(self.keys.decisions, 0, DECISIONS_KEPT - 1).execute()

    def history(self, limit: int) -> list[dict]:
        return [json.loads(raw) for raw in self.client.lrange(self.keys.decisions, 0, limit - 1)]


def _waiting(entries: list) -> list[tuple[float, int]]:
    """(arrival time, tokens to prefill) of each prefill-queue entry; one without them is skipped
    (a writer that bypassed stream_entries: it cannot be sized)."""
    found = []
    for _, fields in entries:
        try:
            found.append(stream_entries.read_waiting(fields))
        except stream_entries.EntryError:
            continue
    return found
