"""Typed helpers over Redis Streams; each entry's fields are those of `stream_entries` (the one
module that owns the entry format).

A queued message's life (consumer-group streams: prefill queue, decode admit):
  enqueued   `enqueue` (XADD); counted by `queue_depth` as not yet delivered
  delivered  `read_group` hands it to one consumer; it stays pending until acked
  acked      `ack` once its state is somewhere else (a scheduler, another stream)
  reclaimed  a consumer died before acking: `claim_stale` (XAUTOCLAIM) gives it to a live one
A malformed entry (no `m`, bad JSON, wrong fields) is acked and skipped with a log line: one bad
producer never stops a worker.

Tail streams (cancel, a gateway's replies) have no group: each reader keeps its own cursor and
calls `read_tail`; `CancelWatcher` is that reader for cancels, with a memory, because a cancel can
overtake its request in the queue.

`block_ms` None or 0 means "do not block" everywhere here (unlike Redis, where BLOCK 0 waits
forever). Works with clients made with decode_responses True or False, over RESP2 or RESP3.
Needs Redis >= 6.2 (XAUTOCLAIM); `queue_depth` is exact from 7.0 (XINFO GROUPS lag).
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, Iterable, TypeVar

import redis

from services.common import stream_entries
from services.common.contracts import CancelNotice, KeySpace
from services.common.stream_entries import EntryError

log = logging.getLogger("duoserve.queues")

T = TypeVar("T")


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists. From "0": entries enqueued
    before any worker started are delivered too."""
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def enqueue(client: redis.Redis, stream: str, message: Any, maxlen: int | None = None) -> str:
    """XADD one contract message (the fields of `stream_entries.entry`); returns its entry id.
    `maxlen` trims approximately (~), which is cheap; the stream may briefly hold a little more."""
    return _text(stream_entries.add(client, stream_entries.entry(stream, message, maxlen)))


def read_group(client: redis.Redis, stream: str, group: str, consumer: str, cls: type[T],
               count: int, block_ms: int | None = None) -> list[tuple[str, T]]:
    """Up to `count` new entries for this consumer (XREADGROUP '>'); each stays pending until acked.

    If the group is gone (Redis restarted empty, the stack's keys deleted) it is created again and
    nothing is returned this time.
    """
    if count <= 0:
        return []
    try:
        reply = client.xreadgroup(group, consumer, {stream: ">"}, count=count, block=_block(block_ms))
    except redis.ResponseError as e:
        reply = e
    return group_reply(client, stream, group, cls, reply)


def queue_group_read(pipe: redis.client.Pipeline, stream: str, group: str, consumer: str, count: int) -> None:
    """`read_group` without blocking, as one command of a pipeline; pass its result to `group_reply`
    (the pipeline executed with raise_on_error=False)."""
    pipe.xreadgroup(group, consumer, {stream: ">"}, count=count)


def group_reply(client: redis.Redis, stream: str, group: str, cls: type[T], reply: Any) -> list[tuple[str, T]]:
    """The decoded entries of an XREADGROUP reply (or the error it raised: a missing group is made
    again and nothing returned; any other error is raised)."""
    if isinstance(reply, redis.ResponseError):
        if "NOGROUP" not in str(reply):
            raise reply
        log.warning("consumer group %s of %s is missing; creating it again", group, stream)
        ensure_group(client, stream, group)
        return []
    if isinstance(reply, Exception):
        raise reply
    return _decode_acking_bad(client, stream, group, cls, _entries_of(reply))


def ack(client: redis.Redis, stream: str, group: str, ids: Iterable[str]) -> int:
    """XACK; returns how many were pending."""
    ids = list(ids)
    return int(client.xack(stream, group, *ids)) if ids else 0


def claim_stale(client: redis.Redis, stream: str, group: str, consumer: str, cls: type[T],
                min_idle_ms: int, count: int) -> list[tuple[str, T]]:
    """Take over up to `count` entries pending for at least `min_idle_ms` with any consumer (one that
    died, or this one before a restart). They stay pending, now with `consumer`, until acked.
    Entries deleted from the stream meanwhile are dropped from the pending list by Redis."""
    if count <= 0:
        return []
    claimed: list[tuple[Any, Any]] = []
    cursor: Any = "0-0"
    try:
        while len(claimed) < count:
            reply = client.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count - len(claimed))
            cursor, entries = reply[0], reply[1]
            claimed.extend(e for e in entries if e[0] is not None and e[1] is not None)
            if _text(cursor) == "0-0":
                break
    except redis.ResponseError as e:
        if "NOGROUP" not in str(e):
            raise
        ensure_group(client, stream, group)
        return []
    return _decode_acking_bad(client, stream, group, cls, claimed)


def group_consumers(client: redis.Redis, stream: str, group: str) -> list[tuple[str, int]]:
    """(name, entries pending with it) for every consumer of the group; [] without the group."""
    try:
        infos = client.xinfo_consumers(stream, group)
    except redis.ResponseError:
        return []
    return [(_text(info["name"]), int(info["pending"])) for info in infos]


def take_over_consumer(client: redis.Redis, stream: str, group: str, consumer: str, dead: str,
                       cls: type[T]) -> list[tuple[str, T]]:
    """Every entry pending with the consumer `dead`, claimed for `consumer` (still pending: acked once
    handled), oldest first; then `dead` is removed from the group. Entries deleted from the stream
    meanwhile are dropped (XCLAIM skips them)."""
    claimed: list[tuple[Any, Any]] = []
    for _ in range(1000):          # 1000 entries a time; bounded in case an old Redis keeps deleted ids
        pending = client.xpending_range(stream, group, min="-", max="+", count=1000, consumername=dead)
        if not pending:
            break
        ids = [p["message_id"] for p in pending]
        claimed.extend(e for e in client.xclaim(stream, group, consumer, 0, ids) if e[0] is not None and e[1])
        if len(pending) < 1000:
            break
    client.xgroup_delconsumer(stream, group, dead)
    return _decode_acking_bad(client, stream, group, cls, claimed)


def read_own_pending(client: redis.Redis, stream: str, group: str, consumer: str, cls: type[T],
                     batch: int = 1000) -> list[tuple[str, T]]:
    """Every entry pending with `consumer`, oldest first: XREADGROUP from id 0 reads its own
    delivered-but-unacked history, nothing new (what a consumer that lost track of its state takes up
    again). Entries deleted from the stream meanwhile are skipped; [] without the group."""
    found: list[tuple[Any, Any]] = []
    after = "0"
    while True:
        try:
            reply = client.xreadgroup(group, consumer, {stream: after}, count=batch)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            ensure_group(client, stream, group)
            return []
        entries = _entries_of(reply)
        found.extend(e for e in entries if e[1])
        if len(entries) < batch:
            break
        after = _text(entries[-1][0])
    return _decode_acking_bad(client, stream, group, cls, found)


def tail_cursor(client: redis.Redis, stream: str) -> str:
    """The id of the newest entry ever added ("$" made concrete); "0-0" if the stream does not exist,
    so that everything added from now on is read."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:
        return "0-0"
    return _text(info["last-generated-id"])


def read_tail(client: redis.Redis, stream: str, cls: type[T], last_id: str, count: int,
              block_ms: int | None = None) -> tuple[list[tuple[str, T]], str]:
    """Entries after `last_id` (plain XREAD, no group); returns them and the cursor to pass next time.

    `last_id` "$" means "only what comes after now": it is turned into the current last id first, so
    nothing added between two non-blocking calls is missed. Malformed entries are skipped (logged)
    and the cursor moves past them.
    """
    decoded, cursor, _ = _read_tail(client, stream, cls, last_id, count, block_ms)
    return decoded, cursor


def queue_depth(client: redis.Redis, stream: str, group: str) -> int:
    """Entries not yet delivered to the group plus those delivered but not acked.

    Exact when Redis reports the group's lag (7.0+, no XDEL inside the unread range); otherwise XLEN,
    an upper bound (acked entries still in the stream count too). 0 when the stream does not exist.
    """
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0
    for info in groups:
        if _text(info["name"]) == group:
            lag = info.get("lag")
            if lag is None:
                return int(client.xlen(stream))
            return int(info["pending"]) + int(lag)
    return int(client.xlen(stream))       # no group yet: nothing was delivered


class CancelWatcher:
    """One process's view of the cancel stream: which request ids were cancelled recently.

    The first `poll` replays the last `ttl_s` of the stream (stream ids are times), so a worker that
    starts, or restarts, after a cancel was published still knows of it when the request reaches it.
    Ids are remembered for `ttl_s` after their cancel was published, and at most `max_ids` of them.
    """

    def __init__(self, keys: KeySpace, *, max_ids: int = 10_000, ttl_s: float = 600.0,
                 replay: bool = True, batch: int = 1000) -> None:
        if max_ids < 1 or ttl_s <= 0 or batch < 1:
            raise ValueError("max_ids and batch must be at least 1, ttl_s positive")
        self.stream = keys.cancel
        self.max_ids = max_ids
        self.ttl_s = ttl_s
        self.replay = replay
        self.batch = batch
        self._cursor: str | None = None                                  # None until the first poll
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()   # id -> published at

    def poll(self, client: redis.Redis) -> set[str]:
        """Read what was published since the last poll, without blocking; returns the ids not seen
        before (a request cancelled twice is reported once)."""
        pipe = client.pipeline(transaction=False)
        self.queue_read(client, pipe)
        return self.take(client, pipe.execute(raise_on_error=False)[0])

    def queue_read(self, client: redis.Redis, pipe: redis.client.Pipeline) -> None:
        """`poll`'s read as one command of a pipeline (a worker reads cancels and new work in one
        round trip); hand its result to `take`."""
        if self._cursor is None:
            self._cursor = self._start_cursor(client)
        pipe.xread({self.stream: self._cursor}, count=self.batch)

    def take(self, client: redis.Redis, reply: Any) -> set[str]:
        """The new ids of a `queue_read` reply; reads on by itself while the stream had more."""
        if isinstance(reply, Exception):
            raise reply
        new: set[str] = set()
        entries = _entries_of(reply)
        while True:
            for raw_id, fields in entries:
                entry_id = _text(raw_id)
                self._cursor = entry_id
                notice = _decode(self.stream, CancelNotice, entry_id, fields)
                if notice is None:
                    continue
                if notice.request_id not in self._seen:
                    new.add(notice.request_id)
                self._seen[notice.request_id] = _id_time(entry_id)
                self._seen.move_to_end(notice.request_id)
            if len(entries) < self.batch:
                break
            entries = _entries_of(client.xread({self.stream: self._cursor}, count=self.batch))
        self._forget_old()
        return new

    def is_cancelled(self, request_id: str) -> bool:
        published = self._seen.get(request_id)
        return published is not None and published >= time.time() - self.ttl_s

    def __len__(self) -> int:
        return len(self._seen)

    def _start_cursor(self, client: redis.Redis) -> str:
        if not self.replay:
            return tail_cursor(client, self.stream)
        seconds, micros = client.time()            # the server's clock: the one stream ids come from
        since_ms = int(seconds) * 1000 + int(micros) // 1000 - int(self.ttl_s * 1000)
        return f"{max(since_ms, 0)}-0"

    def _forget_old(self) -> None:
        horizon = time.time() - self.ttl_s
        while self._seen:
            oldest_id, published = next(iter(self._seen.items()))
            if len(self._seen) <= self.max_ids and published >= horizon:
                break
            del self._seen[oldest_id]


# ---------------------------------------------------------------------------------------------

def _read_tail(client: redis.Redis, stream: str, cls: type[T], last_id: str, count: int,
               block_ms: int | None) -> tuple[list[tuple[str, T]], str, int]:
    if last_id == "$":
        last_id = tail_cursor(client, stream)
    if count <= 0:
        return [], last_id, 0
    entries = _entries_of(client.xread({stream: last_id}, count=count, block=_block(block_ms)))
    decoded = []
    for entry_id, fields in entries:
        message = _decode(stream, cls, _text(entry_id), fields)
        if message is not None:
            decoded.append((_text(entry_id), message))
    cursor = _text(entries[-1][0]) if entries else last_id
    return decoded, cursor, len(entries)


def _decode_acking_bad(client: redis.Redis, stream: str, group: str, cls: type[T],
                       entries: list[tuple[Any, Any]]) -> list[tuple[str, T]]:
    good, bad = [], []
    for raw_id, fields in entries:
        entry_id = _text(raw_id)
        message = _decode(stream, cls, entry_id, fields)
        if message is None:
            bad.append(entry_id)
        else:
            good.append((entry_id, message))
    if bad:
        client.xack(stream, group, *bad)
    return good


def _decode(stream: str, cls: type[T], entry_id: str, fields: Any) -> T | None:
    """The entry's message, or None (logged) if it is not a valid `cls`."""
    try:
        return stream_entries.read(cls, fields)
    except EntryError as e:
        log.warning("skipping entry %s of %s: %s", entry_id, stream, e)
        return None


def _entries_of(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of a one-stream XREAD/XREADGROUP reply, RESP2 ([[stream, entries]]) or RESP3
    ({stream: [entries]}, which redis-py wraps in one more list)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        entries: list[tuple[Any, Any]] = []
        for value in reply.values():
            for item in value:
                entries.extend(item if isinstance(item, list) else [item])
        return entries
    return [entry for _, stream_entries in reply for entry in stream_entries]


def last_ids(reply: Any) -> dict[str, str]:
    """Stream name -> the id of its last entry in an XREAD reply over several streams (RESP2 or
    RESP3); streams with nothing new are absent."""
    if not reply:
        return {}
    found: dict[str, str] = {}
    for stream, value in (reply.items() if isinstance(reply, dict) else reply):
        entries = _entries_of({stream: value} if isinstance(reply, dict) else [[stream, value]])
        if entries:
            found[_text(stream)] = _text(entries[-1][0])
    return found


def _block(block_ms: int | None) -> int | None:
    return int(block_ms) if block_ms else None


def _id_time(entry_id: str) -> float:
    """Wall-clock seconds at which Redis created an entry (the first part of its id)."""
    return int(entry_id.split("-", 1)[0]) / 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
