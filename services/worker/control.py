"""State shared between the worker's loop (main thread) and its gRPC handlers (pool threads).

The loop owns the engine; handlers only leave requests here (a new share, drain) and read the
latest stats snapshot. Everything crosses under one lock; the loop applies requests at an
iteration boundary.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

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
    requested_at: float = 0.0          # wall clock of the SetComputeShare call (a handover's latency starts)
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


class WorkerControl:
    """Thread-safe mailbox between gRPC handlers and the loop."""

    def __init__(self, initial: ShareState) -> None:
        self._lock = threading.Lock()
        self._share = initial
        self._requested: ShareState | None = None
        self._stats = StatsSnapshot()
        self._units: ComputeUnits | None = None     # measured by the loop; None until the first probe
        self._draining = False
        self._retuning = False      # a standby is warming up to take over (retune by handover)
        self._stopping = threading.Event()

    def request_share(self, share: ShareState) -> ShareState:
        with self._lock:
            self._requested = replace(share, pending=True, requested_at=time.time())
            return self._requested

    def take_requested_share(self) -> ShareState | None:
        with self._lock:
            requested, self._requested = self._requested, None
            return requested

    def share_applied(self, share: ShareState, iteration: int) -> ShareState:
        with self._lock:
            self._share = replace(share, pending=False, applied_at_iteration=iteration,
                                  applied_at_unix_ms=int(time.time() * 1000))
            return self._share

    @property
    def share(self) -> ShareState:
        with self._lock:
            return self._requested or self._share

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

    def set_retuning(self, retuning: bool) -> None:
        with self._lock:
            self._retuning = retuning

    @property
    def retuning(self) -> bool:
        with self._lock:
            return self._retuning

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
