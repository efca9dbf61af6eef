"""What a worker reads at the start of an iteration, with as few Redis round trips as it can.

An iteration's reads:
  blocks     split decode's grant asked for during the last forward pass (`ask_growth_ahead`, on the
             publisher's thread) is adopted first: its rows find their next block in their tables
  skipped    a busy worker whose doorbell did not ring (nothing new on its input or cancel stream:
             doorbell.py), and whose last read did not fill its room, reads nothing
  read       otherwise one pipeline: the cancel stream, up to `room` new entries (the consumer group's
             XREADGROUP), and decode's growth for rows the grant ahead missed; an idle worker then
             blocks on its input stream for `idle_block_ms`
The caller drops what was cancelled and admits the entries (`Reads`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import redis

from services.common.contracts import KeySpace
from services.common.redis_queues import CancelWatcher, group_reply, queue_group_read, read_group
from services.engine.scheduler import Scheduler
from services.worker.doorbell import InputDoorbell
from services.worker.publisher import PipelinePublisher, Sent


@dataclass(frozen=True, slots=True)
class Reads:
    cancelled: set[str] = field(default_factory=set)   # request ids cancelled since the last read
    entries: list = field(default_factory=list)        # new input entries: (entry id, message)
    blocked: bool = False                               # idle, it waited on its input stream


@dataclass(frozen=True, slots=True)
class InputStream:
    """Where a worker's work comes from: one stream, read through one consumer group."""

    name: str
    group: str
    consumer: str                 # this worker's id
    message_type: type            # QueuedRequest or Handoff


class InputReader:
    """One worker's reads: cancels, new work and split decode's block growth."""

    def __init__(self, client: redis.Redis, keys: KeySpace, stream: InputStream, scheduler: Scheduler,
                 publisher: PipelinePublisher, *, grows_decode: bool, overlapped: bool, idle_block_ms: int,
                 name: str) -> None:
        self.client, self.stream, self.scheduler, self.publisher = client, stream, scheduler, publisher
        self.cancels = CancelWatcher(keys)
        self.grows_decode = grows_decode           # split decode: its rows grow block by block
        self.overlapped = overlapped               # a doorbell and the grant ahead (--overlap-publish on)
        self.idle_block_ms = idle_block_ms
        self.doorbell = InputDoorbell(client, (stream.name, keys.cancel), name=f"{name}-doorbell") \
            if overlapped else None
        self._growth: list = []                                  # (request id, blocks) asked for in this read
        self._growth_ahead: tuple[list, Sent] | None = None      # asked during the forward pass
        self._inputs_left = True                                 # the last read may have left entries unread

    def poll(self, room: int) -> Reads:
        """This iteration's reads (see the module's docstring); `room`: how many requests it may take."""
        self.adopt_growth_ahead()
        rang = self.doorbell is None or self.doorbell.take()     # taken before the read: later entries ring again
        if self.scheduler.has_work() and not rang and not self._inputs_left:
            return Reads()
        pipe = self.client.pipeline(transaction=False)
        self.cancels.queue_read(self.client, pipe)
        if room > 0:
            queue_group_read(pipe, self.stream.name, self.stream.group, self.stream.consumer, room)
        self._growth = self.scheduler.upcoming_decode_growth() if self.grows_decode else []
        if self._growth:
            self.scheduler.blocks.queue_allocate_many(pipe, self._growth)
        replies = pipe.execute(raise_on_error=False)
        if self._growth:
            self._adopt(self.scheduler.blocks.granted_from(replies[-1], self._growth))
            self._growth = []
        cancelled = self.cancels.take(self.client, replies[0])
        entries = self._entries(replies[1]) if room > 0 else []
        self._inputs_left = room <= 0 or len(entries) >= room
        blocked = room > 0 and not entries and not self.scheduler.has_work()
        if blocked:
            entries = read_group(self.client, self.stream.name, self.stream.group, self.stream.consumer,
                                 self.stream.message_type, room, self.idle_block_ms)
        return Reads(cancelled, entries, blocked)

    def ask_growth_ahead(self) -> None:
        """Split decode, overlapped: the blocks this batch's rows need for the token after this one,
        asked for on the publisher's thread during the forward pass; adopted at the next poll, so
        `schedule` finds them granted (rows that finish meanwhile: their publish, behind this on the
        same thread, frees the grant with the rest of their blocks)."""
        if not (self.grows_decode and self.overlapped):
            return
        growth = self.scheduler.upcoming_decode_growth(steps_ahead=1)
        if growth:
            pipe = self.client.pipeline(transaction=False)
            self.scheduler.blocks.queue_allocate_many(pipe, growth)
            self._growth_ahead = (growth, self.publisher.submit(pipe, keep_reply=True))

    def adopt_growth_ahead(self) -> None:
        if self._growth_ahead is None:
            return
        growth, sent = self._growth_ahead
        self._growth_ahead = None
        self._adopt(self.scheduler.blocks.granted_from(self.publisher.wait_for(sent)[-1], growth))

    def abandon(self) -> None:
        """Forget the reads in progress (a lost connection: the grant asked for ahead is dropped with
        the publisher's queue, and what it granted is in the requests' block lists in Redis, where
        the worker takes its requests up again from); the next poll reads."""
        self._growth, self._growth_ahead, self._inputs_left = [], None, True

    def close(self) -> None:
        if self.doorbell is not None:
            self.doorbell.close()

    def _adopt(self, granted: dict[str, list[int]]) -> None:
        self.scheduler.blocks.free_many(self.scheduler.adopt_blocks(granted))     # rows gone meanwhile

    def _entries(self, reply: object) -> list:
        return group_reply(self.client, self.stream.name, self.stream.group, self.stream.message_type, reply)
