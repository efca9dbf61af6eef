"""Writes the gateway could not make while Redis was away, made in order once it is back.

Cancels, request-id releases and request-record deletions: each is idempotent (one that had landed
after all does no harm), so the outbox simply writes them again. Bounded: beyond OUTBOX_MAX the oldest
are dropped (their ids and records expire or are swept by themselves).
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

OUTBOX_MAX = 10_000

Write = Callable[[], Awaitable[object]]


class Outbox:
    def __init__(self, redis_suspected: asyncio.Event) -> None:
        self.redis_suspected = redis_suspected     # set on every kept write: the watch probes at once
        self.writes: list[Write] = []

    def keep(self, write: Write) -> None:
        self.redis_suspected.set()
        self.writes.append(write)
        del self.writes[:-OUTBOX_MAX]

    async def flush(self) -> None:
        """Every kept write, in order; a connection error leaves it and the rest kept."""
        while self.writes:
            await self.writes[0]()
            self.writes.pop(0)

    def clear(self) -> None:
        self.writes.clear()

    def __len__(self) -> int:
        return len(self.writes)
