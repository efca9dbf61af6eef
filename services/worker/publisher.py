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

Back-pressure: at most `depth` pipelines wait; the loop blocks on the next one (and that wait
counts as host time). A failed send is raised on the loop's thread at the next `submit`/`flush`.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import redis

_STOP = None


class PipelinePublisher:
    """A FIFO of built pipelines, executed by one daemon thread."""

    def __init__(self, on_reply: Callable[[list], None], depth: int = 2, name: str = "publisher",
                 threaded: bool = True) -> None:
        self._on_reply = on_reply             # called with each pipeline's replies (on the thread, if any)
        self._pending: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, pipe: redis.client.Pipeline) -> None:
        """Queue one pipeline; blocks while `depth` are already waiting."""
        self._raise_failure()
        if self._thread is None:
            self._on_reply(pipe.execute())
            return
        self._pending.put(pipe)

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
            pipe = self._pending.get()
            try:
                if pipe is _STOP:
                    return
                if self._error is None:       # after a failure nothing more is sent until it is raised
                    self._on_reply(pipe.execute())
            except BaseException as e:        # noqa: BLE001 (re-raised on the loop's thread)
                self._error = e
            finally:
                self._pending.task_done()
