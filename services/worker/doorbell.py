"""Rings when a worker's input stream or the cancel stream gets a new entry, so a busy loop reads
its inputs only when there is something to read.

A busy worker used to ask Redis for cancels and new work at the start of every iteration: a round
trip between two forward passes, mostly answered "nothing" (issue 11's host time). Here one thread
blocks in one XREAD on both streams, without a consumer group (it only looks: the loop still reads
with its group), and sets an event when anything was added. The loop `take`s the event *before* it
reads, so an entry added after that read rings again: nothing waits more than one iteration for
the loop to see it. Entries that another consumer of the group takes ring too (a spare round trip,
no harm). While Redis does not answer, the bell keeps ringing, so the loop's own read meets the
error.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import redis

from services.common.redis_queues import last_ids, tail_cursor

log = logging.getLogger(__name__)

RETRY_S = 0.5          # after a failed XREAD


class InputDoorbell:
    """One daemon thread watching `streams`; `take` says whether anything was added since the last."""

    def __init__(self, client: redis.Redis, streams: Sequence[str], block_ms: int = 500,
                 name: str = "doorbell") -> None:
        self._client = client
        self._block_ms = block_ms
        self._cursors = {stream: tail_cursor(client, stream) for stream in streams}   # before the loop's first read
        self._rang = threading.Event()
        self._rang.set()                     # the first iteration reads: what came before is the loop's to find
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def take(self) -> bool:
        """True (and silenced) if an entry was added since the last `take` returned True."""
        if not self._rang.is_set():
            return False
        self._rang.clear()
        return True

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=2 * self._block_ms / 1000)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                reply = self._client.xread(self._cursors, count=100, block=self._block_ms)
            except redis.RedisError as e:
                log.debug("doorbell read failed (%s); ringing until Redis answers", e)
                self._rang.set()
                self._stopping.wait(RETRY_S)
                continue
            added = last_ids(reply)
            if added:
                self._cursors.update(added)
                self._rang.set()
