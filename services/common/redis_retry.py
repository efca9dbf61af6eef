"""Going on through a Redis restart: one client shape, one backoff, one outage log for every process.

The stack's Redis may die and come back (the supervisor restarts it with its append-only file, so
nothing it acknowledged is lost). A process's view of it:
  connected  commands go out on a `client`/`async_client`, whose redis-py retry is off: a command that
             failed is never re-sent behind the caller's back, because a write whose reply was lost
             (a MULTI/EXEC, an XADD, an allocation script) may have been applied, and only the caller
             knows how to find out
  lost       a command raised one of CONNECTION_ERRORS (refused, reset, LOADING while the AOF is read):
             the caller stops what it was doing and says so with `Outage.lost` (one log line per outage)
  waiting    `wait_until_up` (`wait_until_up_async`) pings with `Backoff` (50 ms doubling to 1 s,
             jittered) until Redis answers
  back       `Outage.back` logs one line with how long it was away; the caller re-reads its state
  data lost  Redis came back without its data (no append-only file): `DataEpoch` tells, because the
             token every process of the stack read at start is gone; each process then fails what it
             held, with a message the client can act on
"""
from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

# BusyLoadingError (Redis answering LOADING while it replays its append-only file) is a ConnectionError.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)
UNREACHABLE = "the stack's Redis is unreachable (restarting?); retry in a few seconds"


class DataLost(RuntimeError):
    """Redis came back without the data this process knew (`DataEpoch`)."""


def client(url: str, **options: object) -> redis.Redis:
    """A client that never re-sends a failed command by itself (see the module's docstring)."""
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)


def async_client(url: str, **options: object) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **options)


@dataclass
class Backoff:
    """Delays between attempts: base_s, doubling up to cap_s, each scaled by 1 +- jitter (so that the
    processes of a stack do not all knock at the same instant)."""

    base_s: float = 0.05
    cap_s: float = 1.0
    jitter: float = 0.2
    failures: int = 0

    def next(self) -> float:
        delay = min(self.cap_s, self.base_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return delay * (1 - self.jitter + 2 * self.jitter * random.random())

    def reset(self) -> None:
        self.failures = 0


@dataclass
class Outage:
    """One process's record of Redis being away: one log line when it goes, one when it is back."""

    log: logging.Logger
    doing: str = "waiting for it"          # what this process does meanwhile, for the first line
    since: float | None = field(default=None, init=False)   # time.monotonic() of the first failure

    @property
    def is_down(self) -> bool:
        return self.since is not None

    def lost(self, error: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("redis unreachable (%s: %s); %s", type(error).__name__, error, self.doing)

    def back(self, detail: str = "") -> float:
        """Seconds it was away (0.0 if it never went); logs the second line."""
        if self.since is None:
            return 0.0
        away, self.since = time.monotonic() - self.since, None
        self.log.warning("redis back after %.1f s%s", away, f"; {detail}" if detail else "")
        return away


def wait_until_up(conn: redis.Redis, wait: Callable[[float], bool], backoff: Backoff | None = None) -> bool:
    """Ping until Redis answers (True), or until `wait(delay)` (sleeps `delay`, True when the process
    is stopping) says stop (False). The pool's idle connections are dropped once it answers: they
    may still be the dead server's, and the first command on one would fail again."""
    backoff = backoff or Backoff()
    while True:
        try:
            conn.ping()
            conn.connection_pool.disconnect(inuse_connections=False)
            return True
        except CONNECTION_ERRORS:
            pass
        if wait(backoff.next()):
            return False


async def drop_idle_connections(conn: aioredis.Redis) -> None:
    """After an outage: connections left idle in the pool may be the dead server's (see wait_until_up)."""
    await conn.connection_pool.disconnect(inuse_connections=False)


@dataclass
class DataEpoch:
    """Whether Redis still holds the data this process started with.

    `key` holds a random token, set by whichever process of the stack comes first (SET NX) and kept
    in the append-only file like everything else. A Redis that comes back empty has none: the next
    process to look sets a new one, and every process that knew the old one sees the change."""

    key: str
    token: bytes | None = None              # as this process last read it

    def rejoin(self, conn: redis.Redis) -> bool:
        """Read the token (setting one if there is none): True if it is not the one read before."""
        pipe = conn.pipeline(transaction=False)
        pipe.set(self.key, uuid.uuid4().hex, nx=True)
        pipe.get(self.key)
        return self._adopt(pipe.execute()[1])

    async def rejoin_async(self, conn: aioredis.Redis) -> bool:
        pipe = conn.pipeline(transaction=False)
        pipe.set(self.key, uuid.uuid4().hex, nx=True)
        pipe.get(self.key)
        return self._adopt((await pipe.execute())[1])

    def _adopt(self, current: bytes | str) -> bool:
        current = current.encode() if isinstance(current, str) else current
        lost = self.token is not None and current != self.token
        self.token = current
        return lost
