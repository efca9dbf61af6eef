"""Everything the orchestrator knows, read from Redis alone: queue (with how much of each waiting
prompt the prefix cache holds), workers, KV, timings, latencies.

Also where its own state lives so that a restarted orchestrator picks up where it left off: the
SLO, the policy mode and pinned shares (a hash) and the decision history (a capped list).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import redis

from orchestrator.prefix_view import CacheScope, PromptKeys
from services.common import stream_entries
from services.common.contracts import IterationSample, KeySpace, QueuedRequest, RequestLatency, WorkerReport
from services.common.redis_blocks import (cached_run_from, free_count_from, queue_cache_size, queue_cached_run,
                                          queue_free_count)

DECISIONS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request in the prefill stream (waiting, or being prefilled)."""

    arrival_time: float        # wall clock at the gateway
    prompt_tokens: int         # tokens to prefill in all (its prompt, and the output a recompute adds)
    cached_tokens: int = 0     # of those, the leading run of full blocks in the prefix cache now
                               # (orchestrator/prefix_view.py; 0 when not looked up)

    @property
    def uncached_tokens(self) -> int:
        """The prefill work that will run for it."""
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One tick's view of the stack."""

    now: float
    waiting: tuple[Waiting, ...]
    workers: dict[str, WorkerReport]       # by phase
    kv_free_blocks: int        # free list + cached blocks no request holds (both granted as free)
    kv_total_blocks: int
    kv_cached_blocks: int = 0      # keyed blocks (prefix caching), held by requests or evictable
    kv_evictable_blocks: int = 0   # of those, held by none (counted in kv_free_blocks too)
    block_size: int = 16           # tokens per KV block


class RedisState:
    def __init__(self, client: redis.Redis, keys: KeySpace, prompt_keys: PromptKeys | None = None) -> None:
        self.client = client
        self.keys = keys
        self.prompt_keys = prompt_keys or PromptKeys()     # which waiting prompts are looked up, their keys
        self._timings_cursor = "$"
        self._latency_cursor = "0-0"

    def snapshot(self, max_waiting: int = 4096) -> Snapshot:
        """One round trip for the queue, the reports and the pool; with prefix caching one more for the
        waiting prompts' cached blocks (`cached_tokens`)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xrange(self.keys.prefill_queue, count=max_waiting)
        for phase in ("prefill", "decode", "colocated"):
            pipe.hget(self.keys.worker_stats(phase), stream_entries.FIELD)
        pipe.hmget(self.keys.kv_meta, "num_blocks", "block_size")
        queue_cache_size(pipe, self.keys)
        queue_free_count(pipe, self.keys)
        entries, *reports, (num_blocks, block_size), num_cached, num_free, num_evictable = pipe.execute()
        workers: dict[str, WorkerReport] = {}
        for phase, raw in zip(("prefill", "decode", "colocated"), reports):
            if raw is not None:
                workers[phase] = stream_entries.read_report(raw)
        scope = _cache_scope(workers, int(block_size or 0))
        cached = self.cached_tokens(entries, scope) if scope is not None else {}
        waiting = tuple(Waiting(t, n, cached.get(entry_id, 0)) for entry_id, t, n in _waiting(entries))
        return Snapshot(time.time(), waiting, workers, free_count_from((num_free, num_evictable)),
                        int(num_blocks or 0), int(num_cached or 0), int(num_evictable or 0),
                        scope.block_size if scope is not None else int(block_size or 16))

    def cached_tokens(self, entries: Sequence[tuple[object, Any]], scope: CacheScope) -> dict[object, int]:
        """Entry id -> cached tokens of the prompts of prefill-queue entries (as XRANGE returns them)
        that `prompt_keys` examines: one pipelined HMGET each, one round trip."""
        examined = self.prompt_keys.examine(scope, ((entry_id, _tokens_of(fields)) for entry_id, fields in entries))
        if not examined:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for _, keys in examined:
            queue_cached_run(pipe, self.keys, keys)
        return {entry_id: cached_run_from(reply) * scope.block_size
                for (entry_id, _), reply in zip(examined, pipe.execute())}

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


def _waiting(entries: list) -> list[tuple[object, float, int]]:
    """(entry id, arrival time, tokens to prefill) of each prefill-queue entry; one without them is
    skipped (a writer that bypassed stream_entries: it cannot be sized)."""
    found = []
    for entry_id, fields in entries:
        try:
            found.append((entry_id, *stream_entries.read_waiting(fields)))
        except stream_entries.EntryError:
            continue
    return found


def _cache_scope(workers: dict[str, WorkerReport], block_size: int) -> CacheScope | None:
    """How the worker that admits the queue's requests keys blocks (the prefill worker, or the colocated
    one); None when it does not cache (or is not up, or a pool with no block size)."""
    admits = workers.get("prefill") or workers.get("colocated")
    if admits is None or not admits.prefix_caching or block_size < 1:
        return None
    return CacheScope(block_size, admits.cache_salt)


def _tokens_of(fields: Any) -> Callable[[], Sequence[int]]:
    """What an admission keys of a queued request: its prompt, then the output a recompute adds."""
    def tokens() -> Sequence[int]:
        try:
            request = stream_entries.read(QueuedRequest, fields)
        except stream_entries.EntryError:
            return ()
        return request.prompt_token_ids + request.output_token_ids
    return tokens
