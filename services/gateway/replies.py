"""Reading the reply streams a gateway follows: its own, and those of the gateway ids it adopted.

A delivery's life here:
  read        one XREAD over every followed stream, each from its own cursor (a stream whose last
              request ended is let go: takeover.py)
  dispatched  its tokens go to their request (inflight.py: a token delivered twice is kept once);
              deliveries for requests this process does not hold are skipped
  kept        each stream is trimmed, at most every TRIM_INTERVAL_S, to before its oldest request in
              flight (`since`): every token of those stays readable for a successor's replay
  replayed    adopting a dead gateway's requests reads its stream from their oldest `since` into them,
              before any call can see them (`take_over`)
"""
from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from services.common import stream_entries
from services.common.contracts import KeySpace
from services.common.redis_retry import CONNECTION_ERRORS, Backoff
from services.gateway import adoption, request_ids
from services.gateway.inflight import InFlight, RequestRecord, oldest_since, stream_id_key
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger("duoserve.gateway")

TRIM_INTERVAL_S = 1.0               # the reply streams are trimmed at most this often


class ReplyStreams:
    """The reading half of `Frontend` (frontend.py), which holds the state named here and registers the
    requests (`_register`, `_untrack`)."""

    client: aioredis.Redis
    keys: KeySpace
    metrics: GatewayMetrics
    reply_stream: str                    # this process's own
    requests: dict[str, InFlight]
    cursors: dict[str, str]
    is_adopted: bool
    redis_suspected: asyncio.Event
    _trimmed_at: float

    @property
    def cursor(self) -> str | None:
        """The own reply stream's last entry read (None: not read yet)."""
        return self.cursors.get(self.reply_stream)

    @cursor.setter
    def cursor(self, value: str) -> None:
        self.cursors[self.reply_stream] = value

    async def start_reading(self) -> None:
        """Read the own reply stream from its end on (takeover.Takeover.start calls it once the
        predecessors' requests are adopted, before Attach is served)."""
        self.cursor = await self._reply_tail()
        self.is_adopted = True

    async def take_over(self, origin: str, records: list[RequestRecord]) -> int:
        """Follow requests recorded under gateway id `origin` (a dead gateway's, whose lease this process
        holds now: takeover.py): their output so far replayed from its reply stream, which is read on
        from there; each waits for its client to re-attach (Attach). -> how many were new."""
        fresh = [r for r in records if r.engine_id not in self.requests]
        if not fresh:
            return 0
        adopted = {r.engine_id: InFlight(r, origin=origin, token_ids=list(r.prior_tokens)) for r in fresh}
        stream = self.keys.reply(origin)
        cursor = min((r.since for r in fresh), key=stream_id_key)   # before every delivery of every record
        async for cursor, data in adoption.replay(self.client, stream, cursor):
            self._dispatch(data, cursor, live=False, requests=adopted)
        # From here to the end no await: an Attach sees an adopted request only with its whole output so far,
        # and the reader goes on from the replay's end (or from before it: a delivery read twice is kept once).
        now = time.monotonic()
        for request in adopted.values():
            request.orphan_since = request.last_delivery = now
            record = request.record
            self._register(request, request_ids.RequestIds(
                record.client_id, record.engine_id, self.keys.request_claim(record.client_id) if record.claimed
                else None))
        self.cursors[stream] = min(cursor, self.cursors.get(stream, cursor), key=stream_id_key)
        return len(fresh)

    def drop_origin(self, origin: str, taken_by: str) -> None:
        """Another process holds gateway id `origin` now (this one stalled past its lease): forget its
        requests without a write; their calls end with UNAVAILABLE, so their clients re-attach there."""
        for request in [r for r in self.requests.values() if r.origin == origin]:
            self._untrack(request)
            request.lost_to = taken_by or "another gateway"
            request.changed.set()
        self.cursors.pop(self.keys.reply(origin), None)

    async def read_replies(self) -> None:
        """Dispatch this gateway's reply stream to the waiting requests, forever. While Redis is
        away it asks again with backoff (quietly: redis_watch.py says it once); the cursor stays, and
        the stream is in Redis's append-only file, so no delivery is skipped."""
        backoff = Backoff(cap_s=0.5)
        while True:
            try:
                if self.cursor is None:
                    # "$" made concrete once (as redis_queues.tail_cursor does): an XREAD at "$" after an
                    # empty one would skip what was added between the two, a request's first token.
                    self.cursor = await self._reply_tail()
                batches = await self.client.xread(dict(self.cursors), count=512, block=1000)
                for stream, entries in batches or ():
                    stream = stream.decode() if isinstance(stream, bytes) else stream
                    for entry_id, data in entries:
                        cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        if stream in self.cursors:    # not let go meanwhile (takeover.py)
                            self.cursors[stream] = cursor
                        self._dispatch(data, cursor)
                if batches and time.monotonic() - self._trimmed_at >= TRIM_INTERVAL_S:
                    self._trimmed_at = time.monotonic()
                    await self._trim()
                backoff.reset()
            except CONNECTION_ERRORS:
                self.redis_suspected.set()
                await asyncio.sleep(backoff.next())

    async def _trim(self) -> None:
        """Each reply stream kept from its oldest request in flight on: a successor replays it (adoption.py)."""
        for stream, cursor in list(self.cursors.items()):
            on_it = [r for r in self.requests.values() if self.keys.reply(r.origin) == stream]
            await self.client.xtrim(stream, minid=oldest_since(on_it, cursor), approximate=True)

    async def _reply_tail(self) -> str:
        """The reply stream's newest id; "0-0" while it does not exist, so its first entry is read."""
        try:
            info = await self.client.xinfo_stream(self.reply_stream)
        except aioredis.ResponseError:
            return "0-0"
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else last

    def _dispatch(self, data: dict, entry_id: str, live: bool = True,
                  requests: dict[str, InFlight] | None = None) -> None:
        """Hand an entry's deliveries to their requests (`requests`: being adopted, else those held);
        `live`: just arrived (else replayed at adoption, timed by the entry's id and left out of the
        latency metrics)."""
        try:
            deliveries = stream_entries.read_deliveries(data)
        except stream_entries.EntryError:
            log.warning("malformed reply entry dropped: %r", data)
            return
        now = time.time() if live else stream_id_key(entry_id)[0] / 1000
        held = requests is None
        for delivery in deliveries:
            request = (self.requests if held else requests).get(delivery.request_id)
            if request is None:
                continue
            was_running, last_token = request.is_running, request.last_token_at
            num_new = request.add(delivery, now)
            if not was_running and held:
                self.metrics.num_requests_waiting.dec()
                self.metrics.num_requests_running.inc()
            if live:
                self._observe_tokens(request, last_token, num_new, now)

    def _observe_tokens(self, request: InFlight, last_token: float | None, num_new: int, now: float) -> None:
        if not num_new:
            return
        if last_token is None:
            self.metrics.time_to_first_token.observe(now - request.record.arrival_time)
        else:
            self.metrics.inter_token_latency.observe((now - last_token) / num_new)
