"""The supervisor's side of a retune by succession (services/common/succession.py has the wire,
services/worker/succession.py the workers' side): it starts the standby a worker asks for and tells
the worker when that standby dies before it is ready. A standby's life here:
  asked      a StandbyRequest of the role's live process (pid and start time as the state records
             them, or as the succession chain has them): requests of processes that are not the
             role's are left alone (the worker withdraws its own)
  started    the role's recorded command line and environment (what a restart would run, so an
             operator's edits hold) with the new cores or MPS percentage and `--takeover-from`, into
             the role's log; recorded in Redis (StandbyLaunch), which is also how a supervisor started
             again mid-succession knows not to start a second one
  died       before the switch (its request still stands): the worker is told (StandbyStatus with the
             exit status) and keeps serving; the supervisor's log has the tail of the role's log
  switched   the worker's request is gone and the standby is the role's process: the supervisor's
             watch (follow_successions) has it from here, restarts and all
Runs for `--restart never` stacks too: a succession is no restart. A detached stack started with
`--restart never` has no supervisor, so its workers' requests go unanswered and they keep serving.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from duoserve.pairs import name_in_pair, role_of
from duoserve.stack_plan import SUCCESSION_NAMES
from duoserve.stack_procs import StackState, is_alive, launch_process, log_tail, process_start_time
from services.common import succession as wire


@dataclass(frozen=True, slots=True)
class _Watched:
    role: str
    worker_id: str                   # whose request it answers
    pair: int = 0                    # the pair it belongs to (duoserve/pairs.py): its keys and process name


class Standbys:
    """Starts and watches the standbys of one stack; `tick` once per supervisor tick."""

    def __init__(self, popens: dict[int, subprocess.Popen], say: Callable[[str], None]) -> None:
        self.popens = popens                     # the supervisor's own children (polled there as well)
        self.say = say
        self.watched: dict[int, _Watched] = {}   # standby pid -> what it was started for
        self._client: Any = None
        self._failing = False                    # Redis did not answer at the last tick: said once

    def tick(self, state: StackState) -> None:
        """Best effort: with Redis away nothing is started (the workers time out and keep serving)."""
        if not any(role_of(r.name) in SUCCESSION_NAMES for r in state.processes):
            return
        try:
            client = self._connect(state)
            for pair in range(state.pairs):                  # each pair's requests under its own keys
                self._tick_pair(client, state, pair)
            self._failing = False
        except Exception as e:   # noqa: BLE001: Redis errors of any kind; the next tick tries again
            if not self._failing:
                self.say(f"standby requests unread (retunes by succession wait): {e}")
            self._failing = True
            self.close()

    def _tick_pair(self, client: Any, state: StackState, pair: int) -> None:
        prefix = state.pair_key_prefix(pair)
        requests = wire.requests(client, prefix)
        self._watch(client, state, requests, pair)
        if requests:
            launched = wire.standbys(client, prefix)
            for role, request in requests.items():
                started = launched.get(role)
                if started is None or started.worker_id != request.worker_id:
                    self._start(client, state, request, pair)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _connect(self, state: StackState) -> Any:
        if self._client is None:
            import redis                             # only stacks with workers that retune need it
            self._client = redis.Redis.from_url(state.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return self._client

    def _start(self, client: Any, state: StackState, request: wire.StandbyRequest, pair: int) -> None:
        prefix, name = state.pair_key_prefix(pair), name_in_pair(request.role, pair, state.pairs)
        record = next((r for r in state.processes if r.name == name and r.pid == request.pid
                       and r.start_time in (None, request.start_time)), None)
        if record is None or not is_alive(request.pid, request.start_time):
            return                                   # not the role's process (yet): a later tick, or never
        argv = wire.standby_argv(record.argv, request.cpu_ids, request.worker_id)
        env = wire.standby_env(record.env, request.mps_percentage)
        try:
            popen = launch_process(argv, dict(env), Path(record.log))
        except OSError as e:
            wire.signal_status(client, prefix, request.worker_id,
                               wire.StandbyStatus(0, ready=False, error=f"the standby could not start: {e}"))
            self.say(f"{name}: cannot start a standby: {e}")
            return
        self.popens[popen.pid] = popen
        self.watched[popen.pid] = _Watched(request.role, request.worker_id, pair)
        wire.record_launch(client, prefix, request.role, wire.StandbyLaunch(
            request.worker_id, popen.pid, process_start_time(popen.pid) or 0,
            wire.without_flags(argv, (wire.TAKEOVER_FLAG,)), request.mps_percentage))
        where = f"MPS {request.mps_percentage}%" if request.mps_percentage else f"cores {list(request.cpu_ids)}"
        self.say(f"{name}: standby pid {popen.pid} started at {where} (retune by succession)")

    def _watch(self, client: Any, state: StackState, requests: dict[str, wire.StandbyRequest], pair: int) -> None:
        prefix = state.pair_key_prefix(pair)
        for pid, watched in list(self.watched.items()):
            if watched.pair != pair:
                continue
            popen = self.popens.get(pid)
            code = popen.poll() if popen is not None else 0
            if code is None:
                continue
            del self.watched[pid]
            request = requests.get(watched.role)
            if request is None or request.worker_id != watched.worker_id:
                if not any(r.pid == pid for r in state.processes):
                    self.popens.pop(pid, None)       # withdrawn, and gone: nobody else polls it
                continue                             # switched: the supervisor's watch reports its death
            self.popens.pop(pid, None)
            record = next((r for r in state.processes if r.name == name_in_pair(watched.role, pair, state.pairs)), None)
            self.say(f"{watched.role}: standby pid {pid} exited with status {code} before taking over; "
                     f"{watched.worker_id} keeps serving" +
                     (f"; last lines of {record.log}:\n{log_tail(record.log, 15)}" if record else ""))
            wire.signal_status(client, prefix, watched.worker_id, wire.StandbyStatus(
                pid, ready=False, error=f"standby pid {pid} exited with status {code} before it was ready"))
