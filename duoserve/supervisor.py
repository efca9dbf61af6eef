"""The stack's supervisor: watches every process of a running stack and restarts the ones that die.

It runs inside a foreground `duoserve up`, and for a detached stack as a process of its own
(`python -m duoserve.supervisor`, started by `up --detach` and recorded in the state file, where
`duoserve down` finds and signals it). A process's life here:
  watched    every 0.5 s: alive (its pid together with its start time)? A worker gone after a retune
             by succession lives on as its successor, which is watched in its place
  retuned    a worker that asks for a successor at a new share gets a standby started by the
             supervisor, from the role's recorded command line (duoserve/standbys.py); after the
             switch the successor is the role's process (restarts, `duoserve status`)
  dead       reported with the tail of its log; its restart is scheduled by `restart_policy` (a
             backoff that doubles while it keeps dying; lower stages first)
  restarted  the same command line, environment, ports and log file; the state file records the new
             pid and the restart count (`duoserve status`); waited on until healthy, so the stage
             above it comes back only after it. The workers restart with a restarted arena only
             where its memory did not survive (`stack_plan.restart_with`: CUDA, or a CPU arena that
             could not re-open its segments): killed (SIGKILL, so their requests stay pending and
             their successors recompute them), on CUDA as soon as the arena is found dead
  stopped    SIGTERM, SIGINT or SIGHUP (what `duoserve down` sends), or its state file removed: the
             whole stack is torn down, in reverse stage order
With restarts off (`duoserve up --restart never`) the first death stops the stack instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from duoserve.restart_policy import RestartPolicy, RestartTracker
from duoserve.standbys import Standbys
from duoserve.pairs import pair_of, role_of
from duoserve.stack_plan import HEALTHY, STATE_FILE, lost_with, restart_with
from duoserve.stack_procs import (ProcessRecord, StackState, arena_memory, follow_successions, record_health, is_alive,
                                  launch_process, log_tail, process_start_time, read_state, stack_lock,
                                  stop_processes, write_state)

log = logging.getLogger("duoserve.supervisor")

TICK_S = 0.5
HEALTHY_TIMEOUT_S = 300.0      # a restarted process must be SERVING within this (a worker loads the model)


class Supervisor:
    """Watches one stack's processes; restarts the dead (or, with restarts off, stops at the first)."""

    def __init__(self, state_path: Path, *, restart: bool, stop_requested: threading.Event,
                 say: Callable[[str], None], teardown: Callable[[StackState], None],
                 popens: Sequence[subprocess.Popen] = (), policy: RestartPolicy | None = None,
                 stop_timeout_s: float = 10.0) -> None:
        self.state_path = state_path
        self.stop_timeout_s = stop_timeout_s
        self.restart = restart
        self.stop_requested = stop_requested
        self.say = say
        self.teardown = teardown                     # stops every process of a state and cleans up
        self.popens = {p.pid: p for p in popens}     # our own children: polled, so none stays a zombie
        self.tracker = RestartTracker(policy or RestartPolicy())
        self.standbys = Standbys(self.popens, say)   # retunes by succession: starts the standbys asked for

    def run(self, state: StackState) -> int:
        """Until told to stop (0) or, with restarts off, a process dies (1); then the stack is torn down."""
        now = time.monotonic()
        for record in state.processes:
            self.tracker.started(record.name, record.stage, now)
        status = 0
        while not self.stop_requested.wait(TICK_S):
            if not self.state_path.exists():
                self.say("state file removed: stopping")
                break
            state, dead = self._find_dead(state)
            if dead and not self.restart:
                for record in dead:
                    self._report_death(record)
                status = 1
                break
            for record in dead:
                if not self.tracker.is_dead(record.name):
                    self._report_death(record)
                    self._stop_dependents(state, record.name, lost_with(record.name, state.device))
                    delay = self.tracker.died(record.name, time.monotonic())
                    self.say(f"restarting {record.name} in {delay:g} s")
            for name in self.tracker.next_to_restart(time.monotonic()):
                state = self._restart(state, name)
            self.standbys.tick(state)
        self.standbys.close()
        with stack_lock(self.state_path.parent):
            self.teardown(read_state(self.state_path) or state)
        return status

    # ------------------------------------------------------------------ watching
    def _alive(self, record: ProcessRecord) -> bool:
        popen = self.popens.get(record.pid)
        if popen is not None:
            return popen.poll() is None
        return is_alive(record.pid, record.start_time)

    def _find_dead(self, state: StackState) -> tuple[StackState, list[ProcessRecord]]:
        """(the state with successions followed, the processes dead with nothing in their place).
        The state file is the record (`down`, `status` and an operator read and edit it), so it is read
        again before anything is decided about the dead, and written only when following changed it."""
        if all(self._alive(r) for r in state.processes):
            return state, []
        state = read_state(self.state_path) or state
        followed = follow_successions(state)
        alive_names = {r.name for r in followed.processes if self._alive(r)}
        last_dead = {r.name: r for r in followed.processes if r.name not in alive_names}   # one per name
        current = replace(followed, processes=tuple(r for r in followed.processes
                                                    if self._alive(r) or last_dead.get(r.name) is r))
        if current != state:
            current = self._save(current)              # `down` and `status` see successors without Redis
        return current, list(last_dead.values())

    def _save(self, state: StackState) -> StackState:
        """Write the processes; who supervises is the file's to say (a detached supervisor records itself)."""
        on_file = read_state(self.state_path)
        if on_file is not None:
            state = replace(state, supervisor_pid=on_file.supervisor_pid,
                            supervisor_start_time=on_file.supervisor_start_time)
        write_state(self.state_path, state)
        return state

    def _report_death(self, record: ProcessRecord) -> None:
        popen = self.popens.pop(record.pid, None)
        how = f"exited with status {popen.returncode}" if popen is not None else "died"   # not our child: no status
        self.say(f"{record.name} (pid {record.pid}) {how}; last lines of {record.log}:\n{log_tail(record.log)}")

    # ------------------------------------------------------------------ restarting
    def _restart(self, state: StackState, name: str) -> StackState:
        """Start `name` again as the state file records it (its command line and environment there win:
        an operator may have changed them), on the same ports and log."""
        on_file = read_state(self.state_path)
        record = next((r for r in (on_file.processes if on_file else ()) if r.name == name), None) \
            or next(r for r in state.processes if r.name == name)
        segments = state.pair_segment_prefix(pair_of(name))
        memory = arena_memory(segments)                  # what the workers of its pair map now
        try:
            popen = launch_process(record.argv, dict(record.env), Path(record.log))
        except OSError as e:
            self.say(f"cannot restart {name}: {e}")
            self.tracker.restarted(name, time.monotonic())   # counts as a start that died at once
            self.tracker.died(name, time.monotonic())
            return state
        self.popens[popen.pid] = popen
        new = replace(record, pid=popen.pid, start_time=process_start_time(popen.pid), restarts=record.restarts + 1)
        state = self._save(replace(state, processes=tuple(new if r.name == name else r for r in state.processes)))
        self.tracker.restarted(name, time.monotonic())
        self.say(f"{name} restarted (pid {new.pid}, restart {new.restarts})")
        self._wait_healthy(new, state)
        kept = bool(memory) and arena_memory(segments) == memory
        if role_of(name) == "arena" and kept and state.device != "cuda":
            self.say("the arena re-opened its memory: the workers go on")
        self._stop_dependents(state, name, restart_with(name, state.device, kept))
        return state

    def _stop_dependents(self, state: StackState, name: str, names: tuple[str, ...]) -> None:
        """Kill what must restart with `name` (stack_plan.restart_with, lost_with); the next ticks
        restart them like any death. SIGKILL, not a graceful stop: a stopping worker ends its requests
        with an error, a killed one leaves them pending in Redis, where its successor takes them up."""
        dependents = [r for r in state.processes if r.name in names and self._alive(r)]
        if dependents:
            self.say(f"killing {', '.join(r.name for r in dependents)}: they restart on the {name}'s new memory "
                     "and take their requests up again")
            stop_processes([(r.pid, r.start_time) for r in dependents], self.stop_timeout_s, graceful=False)

    def _wait_healthy(self, record: ProcessRecord, state: StackState) -> None:
        """Until SERVING, dead, told to stop or HEALTHY_TIMEOUT_S: the next stage waits for it."""
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        while not self.stop_requested.is_set() and time.monotonic() < deadline and self._alive(record):
            if record_health(record, state, timeout_s=1.0) == HEALTHY:
                self.say(f"{record.name} SERVING again")
                return
            self.stop_requested.wait(0.25)


# ---------------------------------------------------------------------------------------------
# The detached supervisor's process
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """The detached supervisor: built once in `main` from its command line."""

    stack_dir: Path
    stop_timeout_s: float

    @property
    def state_path(self) -> Path:
        return self.stack_dir / STATE_FILE


def command(stack_dir: Path, stop_timeout_s: float, python: str = sys.executable) -> list[str]:
    """The detached supervisor's command line (`duoserve up --detach` starts it)."""
    return [python, "-m", "duoserve.supervisor", "--stack-dir", str(stack_dir), "--stop-timeout-s", str(stop_timeout_s)]


def parse_args(argv: Sequence[str] | None) -> SupervisorConfig:
    p = argparse.ArgumentParser(prog="python -m duoserve.supervisor", description=__doc__.split("\n")[0])
    p.add_argument("--stack-dir", type=Path, required=True)
    p.add_argument("--stop-timeout-s", type=float, default=10.0)
    a = p.parse_args(argv)
    return SupervisorConfig(a.stack_dir, a.stop_timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(message)s")
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop_requested.set())
    with stack_lock(config.stack_dir):
        state = read_state(config.state_path)
        if state is None:
            log.error("no stack at %s", config.state_path)
            return 1
        me = os.getpid()            # recorded by us too: `up` may not have written it yet
        state = replace(state, supervisor_pid=me, supervisor_start_time=process_start_time(me))
        write_state(config.state_path, state)
    from duoserve.stack import teardown        # stack imports this module: bound at run time

    def stop_all(current: StackState) -> None:
        teardown(current, config.state_path, config.stop_timeout_s, log.info)

    return Supervisor(config.state_path, restart=True, stop_requested=stop_requested, say=log.info,
                      teardown=stop_all, stop_timeout_s=config.stop_timeout_s).run(state)


if __name__ == "__main__":
    sys.exit(main())
