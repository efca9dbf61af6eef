"""Retune by handover: a standby worker started at the new share takes over from the running one.

A live MPS client's limit cannot change (NVIDIA's MPS documentation), so on the cuda backend a new
share is a new process (semi-PD's handover); the cpu backend can do the same (`--retune-mode
handover`), which is how CI exercises this path with real processes. Both sides run
`services.worker.main`; a handover's life:

  requested  SetComputeShare with another share: at its next iteration boundary the worker starts
             its successor, its own command line with the new cores and `--takeover-from <its id>`
             (cuda: the new CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in its environment). The successor
             stays in the old worker's process group, so stopping the old one's group stops a standby
             too, and old pid -> new pid goes to Redis (`successors`) for the supervisor. The old worker
             keeps serving meanwhile.
  warming    the standby attaches to the arena, builds its engine, runs a warm-up forward on a block
             of its own, then pushes its pid to `handover_ready`. It binds no port yet.
  switch     at its next boundary the old worker sees the ready signal: cancels already dropped, it
             hands over what it holds (decode: every request, its KV left where it is; prefill: its
             blocks freed, the prompts recomputed) by leaving their input entries pending with its
             consumer, synchronizes the device, closes its gRPC and metrics ports, pushes the
             WorkerHandover (what it held, for the log) and exits.
  takeover   the standby binds the same ports (the orchestrator, gateway, duoctl and supervisor find
             it where the old one was), claims the old worker's pending entries and admits them as
             recovery.py does a dead worker's (decode: from each request's progress record and block
             table), so they are pending with the standby, which a kill leaves to recovery.py like any
             worker's; a cancel published meanwhile is honoured (its blocks are freed); it reports the
             switch latency and runs its loop.
  failed     the standby exits before it is ready: the old worker logs it and keeps its share (cpu:
             applies the new one in place). A standby whose parent dies before the switch exits.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import redis
import torch

from services.common import stream_entries
from services.common.contracts import KeySpace, WorkerHandover, from_json, to_json
from services.common.shares import percentage_for_share
from services.engine.blocks import OutOfBlocks
from services.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.engine.sequence import SequenceStatus
from services.worker.compute import apply_cpu_share
from services.worker.config import Phase, successor_environ
from services.worker.control import ShareState

log = logging.getLogger("duoserve.handover")

KEY_TTL_S = 600                 # handover keys outlive any handover, then vanish
STANDBY_TIMEOUT_S = 600.0       # a standby that never gets the old worker's state gives up
WARMUP_TOKENS = 8               # prompt tokens of the warm-up forward (then one decode step)


def successor_argv(phase: Phase, argv: tuple[str, ...], cpu_ids: tuple[int, ...], worker_id: str) -> list[str]:
    """The old worker's command line with `--takeover-from` and the new cores, if any (cuda: none, its
    host threads keep theirs); the values they replace are dropped."""
    replaced = ("--cpus", "--takeover-from") if cpu_ids else ("--takeover-from",)
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.split("=", 1)[0] in replaced:
            skip = "=" not in arg
            continue
        kept.append(arg)
    cores = ("--cpus", ",".join(map(str, cpu_ids))) if cpu_ids else ()
    return [sys.executable, "-m", f"services.{phase.value}.main", *kept, *cores, "--takeover-from", worker_id]


def needs_handover(worker, share: ShareState) -> bool:
    """A new share needs a new process: handover mode, a split worker, other cores or another fraction.
    A token budget alone is applied in place."""
    if worker.config.retune_mode != "handover" or worker.config.phase is Phase.COLOCATED:
        return False
    current = worker.control.share
    if _is_cuda(worker):
        return mps_percentage(share.share) != mps_percentage(current.share)
    return share.cpu_ids != current.cpu_ids


def mps_percentage(share: float) -> int:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for a share (1..100): services.common.shares converts."""
    return percentage_for_share(share)


@dataclass
class Retuner:
    """The retiring side: starts the standby, waits for it at iteration boundaries, hands over."""

    worker: object                          # services.worker.loop.Worker (no import: it imports us)
    stack_cpus: tuple[int, ...]             # a standby starts on all of them, then pins to its share
    release_ports: Callable[[], None]       # closes this process's gRPC and metrics ports
    share: ShareState | None = None         # the share being handed over to
    standby: subprocess.Popen | None = None
    switched: bool = False                  # the standby took over: it outlives this worker

    @property
    def pending(self) -> bool:
        return self.standby is not None

    def begin(self, share: ShareState) -> None:
        """Start the standby at `share`; this worker keeps serving until it is ready. With a standby
        already starting, nothing: SetComputeShare refuses requests during a handover, but one can
        slip in between the loop taking a share and starting its standby, and a second standby would
        race the first for the takeover (the orchestrator re-sends a share its workers do not report)."""
        if self.standby is not None:             # begin sets standby and share together
            log.warning("share %.2f (cores %s) requested during the handover to %.2f (cores %s): not applied",
                        share.share, share.cpu_ids, self.share.share, self.share.cpu_ids)
            return
        w = self.worker
        cuda = _is_cuda(w)
        argv = successor_argv(w.config.phase, w.config.launch_argv, () if cuda else share.cpu_ids,
                              w.config.worker_id)
        percentage = mps_percentage(share.share) if cuda else None
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(self.stack_cpus))     # a child inherits this thread's cores; give it all
        try:
            self.standby = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=successor_environ(percentage),
                                            close_fds=True)
        finally:
            os.sched_setaffinity(0, mine)
        self.share = share
        w.control.set_retuning(True)
        start = _start_time(self.standby.pid)      # with the pid: a recycled pid is never mistaken for it
        w.client.hset(w.keys.successors, str(os.getpid()), f"{self.standby.pid}:{start}")
        log.info("retune to %.2f (cores %s): standby pid %d starting", share.share, share.cpu_ids, self.standby.pid)

    def poll(self) -> bool:
        """At a boundary: True once the standby has taken over (this worker must stop now)."""
        if self.standby is None:
            return False
        w = self.worker
        code = self.standby.poll()
        if code is not None:
            self._failed(f"standby pid {self.standby.pid} exited with status {code} before it was ready")
            return False
        if w.client.lpop(w.keys.handover_ready(w.config.worker_id)) is None:
            return False
        self._switch()
        return True

    def stop_standby(self) -> None:
        """This worker stops before the switch: its standby must not outlive it."""
        if self.standby is not None and not self.switched and self.standby.poll() is None:
            self.standby.terminate()
            try:
                self.standby.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.standby.kill()

    def _failed(self, why: str) -> None:
        w, share = self.worker, self.share
        log.error("retune by handover failed: %s; keeping this worker", why)
        w.client.hdel(w.keys.successors, str(os.getpid()))
        self.standby, self.share = None, None
        w.control.set_retuning(False)
        if share is not None and share.cpu_ids and not _is_cuda(w):
            apply_cpu_share(share.cpu_ids)                  # cpu: the share in place is the next best thing
            w.control.share_applied(share, w.stats.iterations)
            w.report()

    def _switch(self) -> None:
        w, share = self.worker, self.share
        w.flush_published()          # tokens already produced reach the gateway before the standby's
        # What it holds stays pending with its consumer; the standby claims those entries (take_over),
        # so a standby killed later leaves them pending with its own, for recovery.py.
        running, entry_ids, released = [], [], []
        for request_id, tracked in list(w.tracked.items()):
            if w.config.phase is Phase.DECODE and tracked.seq.status is SequenceStatus.RUNNING:
                running.append(tracked.handoff(w.kv_memory))         # KV stays in its blocks, owned by the request
            elif w.config.phase is not Phase.DECODE:        # prefill: recomputed by the standby
                w.scheduler.blocks.free(request_id)
                entry_ids.append(tracked.entry_id)
            else:                                           # decode, not running: no KV to hand over
                w.scheduler.blocks.free(request_id)
                stream_entries.add(w.client, stream_entries.queued(w.keys, tracked.requeued()))
                released.append((tracked.entry_id, request_id))
        w.release_inputs([e for e, _ in released], [r for _, r in released])
        w.tracked.clear()
        self.switched = True
        w.scheduler.running.clear()
        w.scheduler.waiting.clear()
        if _is_cuda(w):
            torch.cuda.synchronize()                        # every write to the shared KV has landed
        self.release_ports()
        message = WorkerHandover(w.config.worker_id, share.share, share.cpu_ids, share.token_budget,
                                 share.requested_at, time.time(), tuple(running), tuple(entry_ids))
        key = w.keys.handover_state(w.config.worker_id)
        w.client.pipeline(transaction=False).rpush(key, to_json(message)).expire(key, KEY_TTL_S).execute()
        log.info("handed over to pid %d: %d running requests, %d queue entries", self.standby.pid,
                 len(running), len(entry_ids))
        w.control.stop()


# ---------------------------------------------------------------------------------------------
# The standby's side
# ---------------------------------------------------------------------------------------------

def warm_up(worker) -> None:
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
        if _is_cuda(worker):
            torch.cuda.synchronize()
    finally:
        blocks.free(request_id)


def wait_for_handover(worker, old_worker_id: str) -> WorkerHandover | None:
    """Signal ready, then wait for the old worker's state. None: stopped, or the old worker is gone."""
    keys: KeySpace = worker.keys
    client: redis.Redis = worker.client
    parent = os.getppid()                                   # the old worker started us
    ready = keys.handover_ready(old_worker_id)
    client.pipeline(transaction=False).rpush(ready, str(os.getpid())).expire(ready, KEY_TTL_S).execute()
    deadline = time.monotonic() + STANDBY_TIMEOUT_S
    while not worker.control.stopping and time.monotonic() < deadline:
        got = client.blpop([keys.handover_state(old_worker_id)], timeout=1)
        if got is not None:
            return from_json(WorkerHandover, got[1])
        if os.getppid() != parent:
            log.error("worker %s exited before handing over", old_worker_id)
            return None
    return None


def take_over(worker, handover: WorkerHandover) -> None:
    """Admit what the old worker held: its pending entries claimed, as a dead worker's are (decode:
    each request's tokens so far and its blocks read back from Redis); cancels published since are
    honoured on admission."""
    worker.cancels.poll(worker.client)
    worker.take_over_from(handover.from_worker_id)
    for tracked in worker.tracked.values():
        tracked.handoff_time = None                        # not a prefill hand-off: keep that metric clean
    if handover.token_budget:
        worker.scheduler.token_budget = handover.token_budget
    share = ShareState(handover.share, handover.cpu_ids, handover.token_budget)
    worker.control.share_applied(share, 0)
    worker.metrics.compute_share.set(handover.share)
    log.info("took over from %s: %d running requests, %d queue entries", handover.from_worker_id,
             len(handover.running), len(handover.pending_entry_ids))


def record_switch(worker, handover: WorkerHandover) -> None:
    """At the successor's first iteration: the switch latency (and the pause within it) is measured."""
    now = time.time()
    total = max(0.0, now - handover.requested_at) if handover.requested_at else 0.0
    stall = max(0.0, now - handover.released_at)
    worker.switch_ms = (total * 1000, stall * 1000)
    worker.metrics.share_switch_seconds.observe(total)
    worker.report()
    log.info("share switch took %.0f ms (paused %.0f ms)", total * 1000, stall * 1000)


def _start_time(pid: int) -> int:
    """The kernel's start time of a process (field 22 of /proc/<pid>/stat), as the supervisor records it."""
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _is_cuda(worker) -> bool:
    return worker.runner.kv_cache.device.type == "cuda"


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
