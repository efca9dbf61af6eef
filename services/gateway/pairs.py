"""The pairs a gateway routes between, as Redis shows them (routing.py decides; this reads).

A pair's view, refreshed every REFRESH_S in one pipelined round trip for all pairs: its prefill
queue's length, and its prefill and decode workers' reports (alive: both written within
DEAD_AFTER_S, as the orchestrator's STALE_REPORT_S judges them; draining: either was told to drain;
decode's running batch and KV free). A request is routed (`route`) by one more round trip when
prefix caching can matter: the prompt's leading full blocks each pair's cache index holds, keyed
with that pair's salt (its prefill report's cache salt: the pair's KV memory). With one pair there
is nothing to decide: every request goes to it, unread, as before pairs existed.

A pair that stops reporting is dead to routing from then on; the requests this gateway had sent it
are sent again elsewhere (Frontend.resend, driven by `dead_pairs`), so a pair that comes back later
gets new work again but never a request twice.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import redis.asyncio as aioredis

from services.common import stream_entries
from services.common.contracts import KeySpace, WorkerReport
from services.common.redis_blocks import cached_run_from, queue_cached_run
from services.common.redis_retry import CONNECTION_ERRORS
from services.engine.prefix_hash import reusable_keys
from services.gateway.routing import PairLoad, RoutingPolicy, choose_pair, retry_target

log = logging.getLogger("duoserve.gateway")

REFRESH_S = 0.25          # how stale the routing view may get
DEAD_AFTER_S = 10.0       # a pair whose prefill or decode has not reported for this long is dead to routing


@dataclass
class Pairs:
    """The routing view of every pair and what this gateway sent since the last refresh."""

    client: aioredis.Redis
    prefixes: tuple[str, ...]
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    on_view: Callable[[PairLoad], None] | None = None             # each pair's view after a refresh (metrics)
    loads: list[PairLoad] = field(init=False)
    reports: list[dict[str, WorkerReport]] = field(init=False)    # per pair, by phase
    sent_since: list[int] = field(init=False)                     # per pair: this gateway's since the refresh
    _keys: dict[str, KeySpace] = field(init=False)

    def __post_init__(self) -> None:
        self._keys = {p: KeySpace(p) for p in self.prefixes}
        # Until the first refresh every pair counts alive: a stack starting up is not refused.
        self.loads = [PairLoad(p, alive=True) for p in self.prefixes]
        self.reports = [{} for _ in self.prefixes]
        self.sent_since = [0] * len(self.prefixes)

    @property
    def is_single(self) -> bool:
        return len(self.prefixes) == 1

    def keys(self, prefix: str) -> KeySpace:
        """A pair's key space (the prefix a RequestRecord names; "" is the first pair's)."""
        return self._keys[prefix or self.prefixes[0]]

    async def run(self) -> None:
        """Refresh forever (a task of the gateway's); Redis away: the last view stands."""
        if self.is_single:
            return
        while True:
            try:
                await self.refresh()
            except CONNECTION_ERRORS:
                pass                        # redis_watch.py handles the outage; routing waits for it
            await asyncio.sleep(REFRESH_S)

    async def refresh(self, now: float | None = None) -> None:
        pipe = self.client.pipeline(transaction=False)
        for prefix in self.prefixes:
            keys = self._keys[prefix]
            pipe.xlen(keys.prefill_queue)
            pipe.hget(keys.worker_stats("prefill"), stream_entries.FIELD)
            pipe.hget(keys.worker_stats("decode"), stream_entries.FIELD)
        replies = await pipe.execute()
        now = time.time() if now is None else now
        for i, prefix in enumerate(self.prefixes):
            queued, prefill, decode = replies[3 * i: 3 * i + 3]
            reports = {phase: stream_entries.read_report(raw) for phase, raw in (("prefill", prefill),
                                                                                ("decode", decode)) if raw}
            self.reports[i] = reports
            self.loads[i] = pair_load(prefix, int(queued or 0), reports, now)
            if self.on_view is not None:
                self.on_view(self.loads[i])
        self.sent_since = [0] * len(self.prefixes)

    async def route(self, prompt: Sequence[int], block_size: int = 0) -> str | None:
        """The prefix of the pair `prompt` goes to; None: no pair may take it now. `block_size`: the
        pool's (0: no prefix lookup)."""
        if self.is_single:
            return self.prefixes[0]
        cached, full = await self._cached_blocks(prompt, block_size)
        index = choose_pair(self.loads, cached, full, self.sent_since, self.policy)
        if index is None:
            return None
        self.sent_since[index] += 1
        return self.prefixes[index]

    def resend_target(self, failed: str) -> str | None:
        index = retry_target(self.loads, failed, self.sent_since, self.policy)
        if index is None:
            return None
        self.sent_since[index] += 1
        return self.prefixes[index]

    def dead_pairs(self) -> set[str]:
        return {load.prefix for load in self.loads if not load.alive}

    async def _cached_blocks(self, prompt: Sequence[int], block_size: int) -> tuple[list[int], int]:
        """(the prompt's leading reusable blocks each pair's cache holds, how many it has): keyed with
        each pair's salt (its prefill's report), looked up in one round trip; 0 for a pair with
        caching off, not alive, or when Redis does not answer (routing then goes by load)."""
        cached = [0] * len(self.prefixes)
        salts = [_salt(reports.get("prefill")) if load.alive else None
                 for load, reports in zip(self.loads, self.reports)]
        if block_size < 1 or len(prompt) <= block_size or not any(s is not None for s in salts):
            return cached, 0
        looked_up: list[int] = []
        full = 0
        pipe = self.client.pipeline(transaction=False)
        for i, salt in enumerate(salts):
            if salt is not None:
                keys = reusable_keys(prompt, block_size, salt)
                full = len(keys)
                queue_cached_run(pipe, self._keys[self.prefixes[i]], keys)
                looked_up.append(i)
        try:
            replies = await pipe.execute()
        except CONNECTION_ERRORS:
            return cached, 0
        for i, reply in zip(looked_up, replies):
            cached[i] = cached_run_from(reply)
        return cached, full


def _salt(report: WorkerReport | None) -> str | None:
    """The salt of a pair's block keys (its prefill's report); None: caching off there, or unknown."""
    if report is None or not report.prefix_caching or not report.cache_salt:
        return None
    return report.cache_salt


def pair_load(prefix: str, queued: int, reports: dict[str, WorkerReport], now: float) -> PairLoad:
    """A pair's routing view from its queue length and its workers' reports."""
    prefill, decode = reports.get("prefill"), reports.get("decode")
    alive = all(r is not None and now - r.updated_at <= DEAD_AFTER_S for r in (prefill, decode))
    if not alive:
        return PairLoad(prefix, alive=False)
    total = decode.kv_blocks_total or prefill.kv_blocks_total
    free = decode.kv_blocks_free / total if total else 1.0
    return PairLoad(prefix, alive=True, draining=prefill.draining or decode.draining, queued=queued,
                    running=decode.num_running + decode.num_waiting, kv_free=free)
