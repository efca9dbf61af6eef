"""Requests of a dead pair sent again to a live one (issue 16: exactly once from the client's view).

Every MOVE_CHECK_S the gateway looks for requests it holds on pairs that routing sees dead
(pairs.py: a worker silent for DEAD_AFTER_S) and sends each again to the least loaded live pair
(Frontend.resend: a new engine id, from the tokens already delivered). With no live pair they wait:
their stall timeout still ends them. A request adopted from a dead gateway has only its prompt's tail
and cannot be sent again; it waits for its pair to come back (the supervisor restarts it) like one of
a single-pair stack.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from services.common.redis_retry import CONNECTION_ERRORS
from services.gateway.inflight import InFlight
from services.gateway.pairs import Pairs

log = logging.getLogger("duoserve.gateway")

MOVE_CHECK_S = 1.0


class Resender(Protocol):
    """What this asks of the frontend (Frontend)."""

    pairs: Pairs
    redis_suspected: asyncio.Event

    def requests_on(self, pairs: set[str]) -> list[InFlight]: ...
    async def resend(self, request: InFlight, pair: str) -> None: ...


async def move_off_dead_pairs(frontend: Resender, interval_s: float = MOVE_CHECK_S) -> None:
    """Forever (a task of the gateway's, with more than one pair)."""
    while True:
        await asyncio.sleep(interval_s)
        await move_once(frontend)


async def move_once(frontend: Resender) -> int:
    """One pass; -> how many requests were sent again."""
    dead = frontend.pairs.dead_pairs()
    moved = 0
    for request in frontend.requests_on(dead) if dead else ():
        target = frontend.pairs.resend_target(request.record.pair)
        if target is None:
            return moved                     # no live pair: they wait
        old = request.record.pair
        try:
            await frontend.resend(request, target)
        except CONNECTION_ERRORS:
            frontend.redis_suspected.set()   # redis_watch.py probes; the next pass tries again
            return moved
        moved += 1
        log.warning("request %s: pair %s is dead; sent again to %s after %d tokens",
                    request.record.client_id, old, target, len(request.token_ids))
    return moved
