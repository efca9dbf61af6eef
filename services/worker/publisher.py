"""Sends each iteration's Redis pipeline from a background thread, overlapped with the next forward.

An iteration's outputs (token deliveries, hand-offs, acks, its timing sample and report) are one
Redis pipeline. Waiting for its reply on the loop's thread puts a round trip, and Redis's own work
on a shared core, between two forward passes; vLLM V1 and SGLang overlap that host work with the
model instead. One thread, first in first out: pipelines go out in the order they were built, so a
request's tokens stay in order and a hand-off never overtakes its first token. A write the loop
makes directly that must follow what is queued (a preempted request re-queued, errors at shutdown,
a handover) calls `flush` first.

Without a thread (`threaded=False`: `--overlap-publish off`) `submit` sends at once, on the caller's
thread, with the same interface.

A pipeline whose reply the loop needs later (decode's blocks for the next iteration, asked for
before the forward pass) is submitted with `keep_reply`: its replies, errors included, go to
`wait_for(sent)` when the loop needs them (normally long there by then), not to `on_reply`.

Back-pressure: at most `depth` pipelines wait (an iteration submits up to two); the loop blocks on the next one (and that wait
counts as host time). A failed send is raised on the loop's thread at the next `submit`/`flush`.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import redis

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

    def _run(self) -> None:
        while True:
            item = self._pending.get()
            if item is _STOP:
                self._pending.task_done()
                return
            pipe, sent = item
            try:
                if self._error is None:       # after a failure nothing more is sent until it is raised
                    self._execute(pipe, sent)
            except BaseException as e:        # noqa: BLE001 (re-raised on the loop's thread)
                self._error = e
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
