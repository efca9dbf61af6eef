"""The pairs half of `Frontend` (frontend.py): which pair a new request goes to, and a request of a
dead pair sent again to another (failover.py drives it; routing.py decides; pairs.py reads Redis).
Frontend holds the state named here, registers the requests and owns `_check_queue` and `_cancel`."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import redis.asyncio as aioredis

from services.common import stream_entries
from services.common.contracts import KeySpace, QueuedRequest
from services.gateway import adoption, request_ids
from services.gateway.errors import NotReady
from services.gateway.inflight import InFlight, RequestRecord
from services.gateway.metrics import GatewayMetrics
from services.gateway.pairs import Pairs
from services.gateway.routing import PairLoad


class PairRequests:
    client: aioredis.Redis
    keys: KeySpace
    metrics: GatewayMetrics
    pairs: Pairs
    requests: dict[str, InFlight]
    by_client: dict[str, str]
    _ids: dict[str, request_ids.RequestIds]
    redis_suspected: asyncio.Event

    async def _pick_pair(self, prompt: list[int]) -> str:
        """The pair's key prefix the request goes to ("" with one pair: the records stay as they were)."""
        pair = await self.pairs.route(prompt, self.info.block_size)
        if pair is None:
            raise NotReady("no pair can take requests now: every pair is dead or draining; retry shortly")
        await self._check_queue(self.pairs.keys(pair))
        if self.pairs.is_single:
            return ""
        self.metrics.routed(pair)
        return pair

    def _pair_seen(self, load: PairLoad) -> None:
        if self.metrics.model_name is not None:
            self.metrics.pair_alive(load.prefix, load.alive)

    async def resend(self, request: InFlight, pair: str) -> None:
        """Send a request whose pair died to `pair`, from the tokens it has: under a new engine id, so
        whatever the dead pair still delivers for the old one is dropped (no token twice, none lost:
        the new pair goes on after them, as after a preemption); the old one is cancelled there for
        when that pair comes back. Its record and claim follow in the same transaction."""
        record = request.record
        old_ids = self._ids[record.engine_id]
        pipe = self.client.pipeline(transaction=True)
        ids = request_ids.resent(pipe, old_ids)
        moved = dataclasses.replace(record, engine_id=ids.engine_id, pair=pair, prior_tokens=tuple(request.token_ids))
        adoption.replace_record(pipe, self.keys, request.origin, record.engine_id, moved)
        stream_entries.add(pipe, stream_entries.queued(self.pairs.keys(pair), QueuedRequest(
            ids.engine_id, request.prompt_ids, record.sampling, self.keys.reply(request.origin),
            record.arrival_time, tuple(request.token_ids))))
        self._rekey(request, moved, ids)        # before it is queued: its first delivery finds it
        try:
            await pipe.execute()
        except BaseException:
            self._rekey(request, record, old_ids)
            raise
        request.last_delivery = time.monotonic()        # the stall timeout starts again on the new pair
        self.metrics.routed(pair)
        self.metrics.resent(record.pair)
        await self._cancel(record.engine_id, "cancelled", record.pair)     # the old id, on the dead pair

    def _rekey(self, request: InFlight, record: RequestRecord, ids: request_ids.RequestIds) -> None:
        self.requests.pop(request.record.engine_id, None)
        self._ids.pop(request.record.engine_id, None)
        request.record = record
        self.requests[record.engine_id], self._ids[record.engine_id] = request, ids
        self.by_client[record.client_id] = record.engine_id

    def requests_on(self, pairs: set[str]) -> list[InFlight]:
        """Requests in flight (not finished) that run on one of `pairs` and can be sent again."""
        return [r for r in self.requests.values() if r.record.pair in pairs and r.finish is None and r.prompt_ids]
