"""The gateway serves while the stack's Redis answers (the shared helpers: services/common/redis_retry.py).

Redis's life as the gateway sees it:
  up         a probe every PROBE_S answers (one round trip: the stack's data epoch, SET NX + GET):
             grpc.health.v1 SERVING, /health 200
  down       a probe fails or takes PROBE_TIMEOUT_S, or a request's own command failed (the frontend
             sets `redis_suspected`, and refuses new requests at once): NOT_SERVING, /health 503, new
             requests UNAVAILABLE ("retry in a few seconds"); streams in flight wait for their next
             token, up to the stall timeout, as the workers make them once Redis is back
  back       SERVING again; the cancels and request-id releases that could not be written meanwhile
             are written now
  data lost  Redis came back empty (DataEpoch): every stream in flight ends with an error saying to
             retry, and the model info is published again (for a gateway or orchestrator that starts
             later; its other fields come back with the next arena)
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Awaitable, Callable

from services.common.redis_retry import CONNECTION_ERRORS, Backoff, DataEpoch, Outage, drop_idle_connections
from services.gateway.frontend import Frontend

log = logging.getLogger("duoserve.gateway")

PROBE_S = 0.5             # between probes while Redis answers
PROBE_TIMEOUT_S = 3.0     # a probe slower than this counts as no answer (a Redis that hangs)
DATA_LOST = ("the stack's Redis restarted without its data (no append-only file?), and this request "
             "was lost with it; send it again")


class RedisWatch:
    """Probes Redis and turns the answer into the gateway's health (`set_serving`)."""

    def __init__(self, frontend: Frontend, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        self.frontend = frontend
        self.set_serving = set_serving
        self.outage = Outage(log, "NOT_SERVING: new requests get UNAVAILABLE, streams in flight wait")
        self.epoch = DataEpoch(frontend.keys.epoch)

    async def run(self) -> None:
        """Forever (cancelled when the gateway drains)."""
        backoff = Backoff(cap_s=PROBE_S)
        while True:
            self.frontend.redis_suspected.clear()
            try:
                lost = await asyncio.wait_for(self.epoch.rejoin_async(self.frontend.client), PROBE_TIMEOUT_S)
                await self._up(lost)
                backoff.reset()
                delay = PROBE_S
            except (*CONNECTION_ERRORS, asyncio.TimeoutError, OSError) as e:
                await self._down(e)
                delay = backoff.next()
            try:       # a request that met a failed command wakes it at once
                await asyncio.wait_for(self.frontend.redis_suspected.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _down(self, error: BaseException) -> None:
        self.frontend.redis_ok = False
        if not self.outage.is_down:
            self.outage.lost(error if str(error) else TimeoutError(f"no answer in {PROBE_TIMEOUT_S:g} s"))
            await self.set_serving(False)

    async def _up(self, data_lost: bool) -> None:
        if self.outage.is_down:
            await drop_idle_connections(self.frontend.client)
        if data_lost:
            await self._after_data_loss()
        await self.frontend.outbox.flush()
        self.frontend.redis_ok = True
        if self.outage.is_down:
            self.outage.back(f"SERVING again ({len(self.frontend.requests)} streams in flight)")
            await self.set_serving(True)

    async def _after_data_loss(self) -> None:
        frontend = self.frontend
        log.error("redis came back without its data: failing the %d streams in flight", len(frontend.requests))
        frontend.fail_all(DATA_LOST)
        frontend.outbox.clear()           # cancels and releases of requests Redis no longer knows
        if frontend.peers is not None:
            await frontend.peers.rejoin()     # the own gateway id's lease, gone with the rest
        if frontend.info is not None:
            await frontend.client.hsetnx(frontend.model_keys.model_info, "json", json.dumps(asdict(frontend.info)))
