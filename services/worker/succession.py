"""Retune by succession: a successor worker started at the new share takes over from the running one.

A live MPS client's limit cannot change (NVIDIA's MPS documentation), so on the cuda backend a new
share is a new process (semi-PD's handover); the cpu backend can do the same (`--retune-mode
succession`, formerly `handover`), which is how CI exercises this path with real processes. Not to be confused with a
request's `Handoff` (prefill -> decode): a succession replaces a whole worker. The wire side
(records, Redis keys) is services/common/succession.py; the state handed over is one contract,
`SuccessionState`, made by `Worker.export_state` and taken in by `Worker.import_state`. A
succession's life:

  requested  SetComputeShare with a share that needs a new process: at its next iteration boundary
             the worker asks the stack's supervisor for a standby (a StandbyRequest in Redis) and
             keeps serving. A share requested from now on is queued (the latest wins) and applied
             after the succession, by the successor or, if it fails, by this worker.
  launched   the supervisor starts the role's recorded command line with the new cores (cuda: the
             new CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) and `--takeover-from <worker id>`, and records it.
  warming    the standby attaches to the arena, builds its engine, runs a warm-up forward on a block
             of its own, then signals ready. It binds no port yet.
  switch     at its next boundary the old worker sees the ready signal: it exports its state (cancels
             already dropped; decode: every request, its KV left where it is; prefill: its blocks
             freed, the prompts recomputed; the input entries left pending with its consumer; the
             device synchronized), closes its gRPC and metrics ports, and in one MULTI pushes the
             SuccessionState and records the successor's pid for the supervisor; then it exits.
  takeover   the successor binds the same ports (the orchestrator, gateway, duoctl and supervisor find
             it where the old one was), imports the state: claims the old worker's pending entries and
             admits them as recovery.py does a dead worker's, so a kill later leaves them to
             recovery.py like any worker's; a cancel published meanwhile is honoured; a queued share
             is applied at its first boundary; it reports the switch latency and runs its loop.
  failed     the standby dies before it is ready, or no supervisor starts one (a detached stack
             started with `--restart never` has none) within LAUNCH_TIMEOUT_S: the old worker logs
             it, withdraws its request and keeps serving at its share (cpu: applies the new one in
             place); a queued share is taken next. A standby whose old worker dies first exits.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from services.common import succession as wire
from services.common.contracts import SuccessionState
from services.common.pids import process_start_time
from services.common.shares import percentage_for_share
from services.engine.blocks import OutOfBlocks
from services.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.worker.compute import apply_cpu_share
from services.worker.config import Phase, WorkerConfig
from services.worker.control import ShareState
from services.worker.fence import kv_fence

if TYPE_CHECKING:                      # loop.py holds a Succession; only the type is needed here
    from services.worker.loop import Worker

log = logging.getLogger("duoserve.succession")

STANDBY_TIMEOUT_S = 600.0       # a standby that never gets the old worker's state gives up
LAUNCH_TIMEOUT_S = 30.0         # no standby recorded by then: no supervisor is starting one
CHECK_S = 0.25                  # how often the retiring worker looks for its standby's launch and life
WARMUP_TOKENS = 8               # prompt tokens of the warm-up forward (then one decode step)


def needs_successor(config: WorkerConfig, current: ShareState, requested: ShareState) -> bool:
    """A new share needs a new process: succession mode, a split worker, other cores or another
    fraction. A token budget alone is applied in place."""
    if config.retune_mode != "succession" or config.phase is Phase.COLOCATED:
        return False
    if config.device == "cuda":
        return mps_percentage(requested.share) != mps_percentage(current.share)
    return requested.cpu_ids != current.cpu_ids


def mps_percentage(share: float) -> int:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for a share (1..100): services.common.shares converts."""
    return percentage_for_share(share)


def _alive(pid: int, start_time: int) -> bool:
    return process_start_time(pid) == start_time


@dataclass
class Succession:
    """The retiring side: asks for a standby, waits for it at iteration boundaries, hands over."""

    worker: Worker
    release_ports: Callable[[], None]       # closes this process's gRPC and metrics ports
    share: ShareState | None = None         # the share being retuned to; None: no succession under way
    standby: wire.StandbyLaunch | None = None   # once the supervisor has started one
    asked_at: float = 0.0                   # time.monotonic() of the request
    next_check: float = 0.0                 # time.monotonic() of the next look at the standby
    switched: bool = False                  # the successor took over: it outlives this worker

    @property
    def pending(self) -> bool:
        return self.share is not None

    def needed(self, share: ShareState) -> bool:
        w = self.worker
        return needs_successor(w.config, w.control.share, share)

    def begin(self, share: ShareState) -> None:
        """Ask the supervisor for a standby at `share`; this worker keeps serving until it is ready."""
        w = self.worker
        cuda = w.config.device == "cuda"
        me = os.getpid()
        wire.request_standby(w.client, w.keys.prefix, wire.StandbyRequest(
            role=w.config.phase.value, worker_id=w.config.worker_id, pid=me, start_time=process_start_time(me) or 0,
            cpu_ids=() if cuda else share.cpu_ids, mps_percentage=mps_percentage(share.share) if cuda else 0,
            requested_at=share.requested_at))
        self.share, self.standby, self.asked_at, self.next_check = share, None, time.monotonic(), 0.0
        w.control.succession_started(share)
        w.report()
        log.info("retune by succession to %.2f (cores %s): standby requested", share.share, share.cpu_ids)

    def poll(self) -> bool:
        """At a boundary: True once the successor has taken over (this worker must stop now)."""
        if self.share is None:
            return False
        w = self.worker
        status = wire.pop_status(w.client, w.keys.prefix, w.config.worker_id)
        if status is not None:
            if not status.ready:
                self._failed(status.error or f"standby pid {status.pid} failed")
                return False
            self._switch(status.pid)
            return True
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CHECK_S
        if self.standby is None:
            self.standby = wire.launch_for(w.client, w.keys.prefix, w.config.phase.value, w.config.worker_id)
            if self.standby is None:
                if now - self.asked_at > LAUNCH_TIMEOUT_S:
                    self._failed(f"no supervisor started a standby within {LAUNCH_TIMEOUT_S:g} s (a detached "
                                 "stack started with --restart never has none)")
                return False
            log.info("standby pid %d starting", self.standby.pid)
        if not _alive(self.standby.pid, self.standby.start_time):
            self._failed(f"standby pid {self.standby.pid} exited before it was ready")
        return False

    def withdraw(self) -> None:
        """This worker stops before the switch: its request goes, and its standby must not outlive it."""
        if self.share is None or self.switched:
            return
        w = self.worker
        wire.withdraw(w.client, w.keys.prefix, w.config.phase.value, w.config.worker_id)
        standby = self.standby or wire.launch_for(w.client, w.keys.prefix, w.config.phase.value, w.config.worker_id)
        if standby is not None and _alive(standby.pid, standby.start_time):
            os.kill(standby.pid, signal.SIGTERM)
        self.share, self.standby = None, None

    def _failed(self, why: str) -> None:
        w, share = self.worker, self.share
        log.error("retune by succession failed: %s; this worker keeps serving", why)
        wire.withdraw(w.client, w.keys.prefix, w.config.phase.value, w.config.worker_id)
        self.share, self.standby = None, None
        if share is not None and share.cpu_ids and w.config.device != "cuda":
            apply_cpu_share(share.cpu_ids)                  # cpu: the share in place is the next best thing
            w.control.share_applied(share, w.stats.iterations)
        else:
            w.control.succession_failed()
        w.report()

    def _switch(self, standby_pid: int) -> None:
        w, share = self.worker, self.share
        standby = self.standby or wire.launch_for(w.client, w.keys.prefix, w.config.phase.value, w.config.worker_id) \
            or wire.StandbyLaunch(w.config.worker_id, standby_pid, process_start_time(standby_pid) or 0, ())
        state = w.export_state(share)             # this worker holds nothing from here on
        self.switched = True
        self.release_ports()
        pipe = w.client.pipeline(transaction=True)
        wire.hand_over(pipe, w.keys.prefix, w.config.phase.value, state, os.getpid(), standby)
        pipe.execute()
        log.info("succession: handed over to pid %d: %d running requests, %d queue entries%s", standby.pid,
                 len(state.running), len(state.pending_entry_ids),
                 f", share {state.queued.share:.2f} queued" if state.queued else "")
        w.control.stop()


# ---------------------------------------------------------------------------------------------
# The standby's side
# ---------------------------------------------------------------------------------------------

def warm_up(worker: Worker) -> None:
    """One prefill and one decode forward on a block of its own, so the first real iteration is not
    the first ever (cuda: kernels loaded, workspaces allocated). The block is freed after."""
    request_id = f"warmup:{worker.config.worker_id}"
    blocks = worker.scheduler.blocks
    try:
        block_ids = tuple(blocks.allocate(request_id, 1))
    except OutOfBlocks:
        log.warning("no free KV block for the warm-up: skipped")
        return
    try:
        tokens = tuple(range(1, WARMUP_TOKENS + 1))
        prefill = ScheduledChunk(request_id, tokens, 0, block_ids, True)
        decode = ScheduledChunk(request_id, (1,), WARMUP_TOKENS, block_ids, True)
        worker.runner.run(SchedulerOutput((prefill,), ()))
        worker.runner.run(SchedulerOutput((), (decode,)))
        kv_fence(worker.runner.kv_cache)
    finally:
        blocks.free(request_id)


def wait_for_state(worker: Worker, old_worker_id: str) -> SuccessionState | None:
    """Signal ready, then wait for the old worker's state. None: stopped, withdrawn, or the old worker
    is gone."""
    prefix, client, role = worker.keys.prefix, worker.client, worker.config.phase.value
    request = wire.request_of(client, prefix, role, old_worker_id)
    if request is None:
        log.error("no succession requested by %s (withdrawn?): exiting", old_worker_id)
        return None
    wire.signal_status(client, prefix, old_worker_id, wire.StandbyStatus(os.getpid(), ready=True))
    deadline = time.monotonic() + STANDBY_TIMEOUT_S
    while not worker.control.stopping and time.monotonic() < deadline:
        state = wire.wait_state(client, prefix, old_worker_id, timeout_s=1)
        if state is not None:
            return state
        if not _alive(request.pid, request.start_time):
            log.error("worker %s exited before handing over", old_worker_id)
            return None
    return None


def record_switch(worker: Worker, state: SuccessionState) -> None:
    """At the successor's first iteration: the switch latency (and the pause within it) is measured."""
    now = time.time()
    total = max(0.0, now - state.requested_at) if state.requested_at else 0.0
    stall = max(0.0, now - state.released_at)
    worker.switch_ms = (total * 1000, stall * 1000)
    worker.metrics.share_switch_seconds.observe(total)
    worker.report()
    log.info("share switch took %.0f ms (paused %.0f ms)", total * 1000, stall * 1000)


def bind_retrying(start: Callable[[], object], timeout_s: float = 10.0) -> object:
    """Start a server on a port the old worker has just closed (a moment may pass before it is free)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return start()
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
