"""Sends each iteration's Redis pipeline from a background thread, overlapped with the next forward.

An iteration's outputs (token deliveries, hand-offs, acks, its timing sample and report) are one
Redis pipeline. Waiting for its reply on the loop's thread puts a round trip, and Redis's own work
on a shared core, between two forward passes; vLLM V1 and SGLang overlap that host work with the
model instead. One thread, first in first out: pipelines go out in the order they were built, so a
request's tokens stay in order and a hand-off never overtakes its first token. A write the loop
makes directly that must follow what is queued (a preempted request re-queued, errors at shutdown,
a succession's switch) calls `flush` first.

Without a thread (`threaded=False`: `--overlap-publish off`) `submit` sends at once, on the caller's
thread, with the same interface.

A pipeline whose reply the loop needs later (decode's blocks for the next iteration, asked for
before the forward pass) is submitted with `keep_reply`: its replies, errors included, go to
`wait_for(sent)` when the loop needs them (normally long there by then), not to `on_reply`.

Back-pressure: at most `depth` pipelines wait (an iteration submits up to two); the loop blocks on the next one (and that wait
counts as host time). A failed send is raised on the loop's thread at the next `submit`/`flush`.

A lost connection is different from a failed command: whether the pipeline in flight was applied is
unknown, and sending the ones queued behind it could apply a later iteration without it. So after a
connection error nothing more is sent at all, and every later call raises it again, until the loop
calls `abandon`: it rebuilds its state from what Redis holds (services/worker/reconnect.py), and
the pipelines still queued, built from the old state, are dropped unsent.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import redis

from services.common.redis_retry import CONNECTION_ERRORS

_STOP = None


class Sent:
    """One submitted pipeline; `PipelinePublisher.wait_for` returns once it was executed."""

    def __init__(self, keep_reply: bool) -> None:
        self.keep_reply = keep_reply
        self.replies: list = []
        self._done = threading.Event()


class PipelinePublisher:
    """A FIFO of built pipelines, executed by one daemon thread."""

    def __init__(self, on_reply: Callable[[list], None], depth: int = 4, name: str = "publisher",
                 threaded: bool = True) -> None:
        self._on_reply = on_reply             # called with each pipeline's replies (on the thread, if any)
        self._pending: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._halted: BaseException | None = None   # a lost connection: nothing is sent until `abandon`
        self._dropping = False                       # inside `abandon`: queued pipelines are skipped
        self._thread = threading.Thread(target=self._run, name=name, daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, pipe: redis.client.Pipeline, keep_reply: bool = False) -> Sent:
        """Queue one pipeline; blocks while `depth` are already waiting. Its replies go to `on_reply`
        (a failed command fails the publisher), or with `keep_reply` to `wait_for` (errors as values)."""
        self._raise_failure()
        sent = Sent(keep_reply)
        if self._thread is None:
            self._execute(pipe, sent)
        else:
            self._pending.put((pipe, sent))
        return sent

    def wait_for(self, sent: Sent) -> list:
        """Once `sent` was executed: its replies if it kept them (a failed send is raised here)."""
        sent._done.wait()
        self._raise_failure()
        return sent.replies

    def flush(self) -> None:
        """Return once every submitted pipeline has been executed."""
        self._pending.join()
        self._raise_failure()

    def abandon(self) -> None:
        """Drop every pipeline not yet sent and forget any failure (after a lost connection: the
        caller rebuilds its state from Redis, so nothing built before may go out after). Returns
        once the thread has nothing in flight."""
        self._dropping = True
        try:
            self._pending.join()
        finally:
            self._dropping = False
            self._error = self._halted = None

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._pending.put(_STOP)
            self._thread.join()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._halted is not None:
            raise self._halted

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is _STOP:
                self._pending.task_done()
                return
            pipe, sent = item
            try:
                if self._error is None and self._halted is None and not self._dropping:
                    self._execute(pipe, sent)     # after a failure nothing more is sent until it is raised
            except BaseException as e:        # noqa: BLE001 (re-raised on the loop's thread)
                self._error = e
                if isinstance(e, CONNECTION_ERRORS):
                    self._halted = e
            finally:
                sent._done.set()
                self._pending.task_done()

    def _execute(self, pipe: redis.client.Pipeline, sent: Sent) -> None:
        try:
            if sent.keep_reply:
                sent.replies = pipe.execute(raise_on_error=False)
            else:
                self._on_reply(pipe.execute())
        finally:
            if self._thread is None:
                sent._done.set()
