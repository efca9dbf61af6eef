"""State shared between the worker's loop (main thread) and its gRPC handlers (pool threads).

The loop owns the engine; handlers only leave requests here (a new share, drain) and read the
latest stats snapshot. Everything crosses under one lock; the loop applies requests at an
iteration boundary, and a share requested during a retune by succession after it (never dropped).
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from services.worker.compute_units import ComputeUnits


@dataclass(frozen=True, slots=True)
class ShareState:
    """A compute share, in effect or requested."""

    share: float                       # fraction of the stack's cores (or of the GPU)
    cpu_ids: tuple[int, ...]           # cores (CPU backend)
    token_budget: int                  # prefill tokens per iteration (0: unchanged / not prefill)
    applied_at_iteration: int = 0
    applied_at_unix_ms: int = 0
    pending: bool = False
    requested_at: float = 0.0          # wall clock of the SetComputeShare call (a succession's latency starts)
    num_units: int = 0                 # SMs (cuda) or cores (cpu) the share is; 0 unknown


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """What GetStats reports; replaced whole by the loop after each iteration."""

    num_running: int = 0
    num_waiting: int = 0
    iterations: int = 0
    tokens_processed: int = 0
    requests_finished: int = 0
    preemptions: int = 0
    last_iteration_ms: float = 0.0
    last_batch_tokens: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0


class ShareStatus(enum.Enum):
    """What a worker does with a requested share: SetComputeShare's reply (worker.proto ShareStatus)."""

    APPLIED = "applied"        # in effect
    ACCEPTED = "accepted"      # applied in place at the next iteration boundary
    RETUNING = "retuning"      # a successor at this share is starting; in effect once it takes over
    QUEUED = "queued"          # a succession is in progress: applied after it (a later request replaces it)


class WorkerControl:
    """Thread-safe mailbox between gRPC handlers and the loop.

    A share's life here: requested (`request_share`; the latest replaces any not yet taken) -> taken by
    the loop at a boundary -> applied in place, or, when it needs a new process, the target of a
    succession (`succession_started`) until the successor takes over or it fails. While a succession
    runs the loop takes nothing: a share requested meanwhile stays queued and is handed to the
    successor (or applied by this worker when the succession fails)."""

    def __init__(self, initial: ShareState) -> None:
        self._lock = threading.Lock()
        self._share = initial                       # in effect
        self._target: ShareState | None = None      # a succession is under way to it
        self._requested: ShareState | None = None   # asked for, not yet taken by the loop
        self._requested_status = ShareStatus.ACCEPTED   # what request_share said would become of it
        self._changed_at = time.time()              # wall clock of the last change to the three above
        self._stats = StatsSnapshot()
        self._units: ComputeUnits | None = None     # measured by the loop; None until the first probe
        self._draining = False
        self._stopping = threading.Event()

    def request_share(self, share: ShareState,
                      needs_successor: Callable[[ShareState, ShareState], bool]) -> tuple[ShareState, ShareStatus]:
        """Leave a share for the loop; -> it as recorded, and what will become of it. `needs_successor`
        (current, requested): whether applying it takes a new process."""
        with self._lock:
            now = time.time()
            self._requested = replace(share, pending=True, requested_at=now)
            self._changed_at = now
            if self._target is not None:
                status = ShareStatus.QUEUED
            elif needs_successor(self._share, self._requested):
                status = ShareStatus.RETUNING
            else:
                status = ShareStatus.ACCEPTED
            self._requested_status = status
            return self._requested, status

    def take_requested_share(self) -> ShareState | None:
        """The share to apply now; None while a succession runs (a request stays queued behind it)."""
        with self._lock:
            if self._target is not None:
                return None
            requested, self._requested = self._requested, None
            return requested

    def take_queued_share(self) -> ShareState | None:
        """At a succession's switch: the share requested during it, for the successor to apply."""
        with self._lock:
            requested, self._requested = self._requested, None
            return requested

    def carry_over(self, share: ShareState) -> None:
        """A share requested of the predecessor during its succession: taken at the next boundary."""
        with self._lock:
            if self._requested is None:                # one asked of this worker since wins
                self._requested, self._requested_status = replace(share, pending=True), ShareStatus.ACCEPTED
                self._changed_at = time.time()

    def succession_started(self, share: ShareState) -> None:
        with self._lock:
            self._target = share
            self._changed_at = time.time()

    def succession_failed(self) -> None:
        """The old share stays (or the caller applies the target in place): a queued one is taken next."""
        with self._lock:
            self._target = None
            if self._requested is not None:
                self._requested_status = ShareStatus.ACCEPTED
            self._changed_at = time.time()

    def share_applied(self, share: ShareState, iteration: int) -> ShareState:
        with self._lock:
            self._share = replace(share, pending=False, applied_at_iteration=iteration,
                                  applied_at_unix_ms=int(time.time() * 1000))
            self._target = None
            self._changed_at = time.time()
            return self._share

    @property
    def share(self) -> ShareState:
        """The share in effect: the cores it runs on now."""
        with self._lock:
            return self._share

    @property
    def wanted(self) -> tuple[ShareState, ShareStatus, float]:
        """The latest share it accepted (queued, being retuned to, or in effect), its status, and when
        the share state last changed: what GetStats and the worker's report say."""
        with self._lock:
            if self._requested is not None:
                status = ShareStatus.QUEUED if self._target is not None else self._requested_status
                return self._requested, status, self._changed_at
            if self._target is not None:
                return self._target, ShareStatus.RETUNING, self._changed_at
            return self._share, ShareStatus.APPLIED, self._changed_at

    @property
    def retuning(self) -> bool:
        """A succession is under way."""
        with self._lock:
            return self._target is not None

    def publish_stats(self, stats: StatsSnapshot) -> None:
        with self._lock:
            self._stats = stats

    @property
    def stats(self) -> StatsSnapshot:
        with self._lock:
            return self._stats

    def publish_units(self, units: ComputeUnits) -> None:
        with self._lock:
            self._units = units

    @property
    def units(self) -> ComputeUnits | None:
        with self._lock:
            return self._units

    def drain(self) -> None:
        with self._lock:
            self._draining = True

    @property
    def draining(self) -> bool:
        with self._lock:
            return self._draining

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_stopping(self, timeout: float) -> bool:
        return self._stopping.wait(timeout)
