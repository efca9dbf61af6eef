"""A retune by succession on the wire: the records and Redis keys by which a worker asks the stack's
supervisor for a successor at a new share, and by which the two hand over. This module owns every
key below; nothing else spells them. Pure Python (the Redis client is passed in): the supervisor,
`duoserve status` and the workers all import it.

A succession's life, and who writes what:
  requested  the worker: HSET <p>:succession:requests <role> StandbyRequest (one per role: the
             retiring worker's pid and start time, the new cores or MPS percentage)
  launched   the supervisor, at its next tick: starts the role's recorded command line with the new
             cores (or CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) and `--takeover-from <worker id>`, then
             HSET <p>:succession:standbys <role> StandbyLaunch (its pid, start time, command line)
  ready      the standby, once warm: RPUSH <p>:succession:<worker id>:ready StandbyStatus(ready);
             the supervisor pushes StandbyStatus(ready=False) when the standby dies before it
  switch     the retiring worker: in one MULTI, RPUSH <p>:succession:<worker id>:state SuccessionState
             (services/common/contracts.py), HSET <p>:successors <old pid> "<new pid>:<start time>"
             (`duoserve status`, `down` and the supervisor follow it), and its request deleted; the
             launch record stays (the successor's command line) until the role's next launch
  failed     the retiring worker withdraws its request (HDEL) and keeps serving

Compatibility: `<p>:successors` keeps its name and value format, so a `duoserve status` or `down` of
a stack started before this module still follows its successors. The ready and state lists moved
from `<p>:handover:<id>:*` to `<p>:succession:<id>:*`: their protocol changed with the supervisor
starting the standby, so a process from before could not take part in a succession either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.contracts import SuccessionState, from_json, to_json

KEY_TTL_S = 600                      # a succession's lists outlive any succession, then vanish
PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"   # as services/common/mps.py names it (no import: mps
                                                       # pulls in nothing heavy, but the supervisor needs only this)
TAKEOVER_FLAG = "--takeover-from"    # a worker's flag: it is a standby for that worker id


@dataclass(frozen=True, slots=True)
class StandbyRequest:
    """A worker asks the supervisor for a successor at a new share."""

    role: str                        # the process's name in the stack ("prefill", "decode")
    worker_id: str                   # the retiring worker: its standby's --takeover-from
    pid: int                         # its process, with its start time: the supervisor checks it is the role's
    start_time: int                  # /proc/<pid>/stat starttime (services/common/pids.py)
    cpu_ids: tuple[int, ...]         # the standby's cores (CPU backend; empty on CUDA: host threads keep theirs)
    mps_percentage: int              # CUDA: the standby's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; 0: unchanged
    requested_at: float              # wall clock of the SetComputeShare call


@dataclass(frozen=True, slots=True)
class StandbyLaunch:
    """The supervisor started a standby for a request."""

    worker_id: str                   # the request it answers
    pid: int
    start_time: int
    argv: tuple[str, ...]            # its command line without --takeover-from: the role's after the switch
    mps_percentage: int = 0          # its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (0: the role's as recorded)


@dataclass(frozen=True, slots=True)
class StandbyStatus:
    """What the retiring worker learns at an iteration boundary."""

    pid: int                         # the standby
    ready: bool                      # True: warm, waiting for the state; False: it failed (error says why)
    error: str = ""


# ----------------------------------------------------------------------------------------- keys

def _requests(prefix: str) -> str:           # hash: role -> StandbyRequest
    return f"{prefix}:succession:requests"


def _standbys(prefix: str) -> str:           # hash: role -> StandbyLaunch
    return f"{prefix}:succession:standbys"


def _ready(prefix: str, worker_id: str) -> str:   # list: StandbyStatus for the retiring worker
    return f"{prefix}:succession:{worker_id}:ready"


def _state(prefix: str, worker_id: str) -> str:   # list: the retiring worker's SuccessionState
    return f"{prefix}:succession:{worker_id}:state"


def _successors(prefix: str) -> str:         # hash: old worker pid -> "successor pid:start time"
    return f"{prefix}:successors"


# ------------------------------------------------------------------------- the retiring worker

def request_standby(client: Any, prefix: str, request: StandbyRequest) -> None:
    """Ask for a standby; a stale status of an earlier attempt is dropped first."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(_ready(prefix, request.worker_id))
    pipe.hset(_requests(prefix), request.role, to_json(request))
    pipe.execute()


def launch_for(client: Any, prefix: str, role: str, worker_id: str) -> StandbyLaunch | None:
    """The standby the supervisor started for this worker's request, if it did yet."""
    raw = client.hget(_standbys(prefix), role)
    launch = from_json(StandbyLaunch, raw) if raw else None
    return launch if launch is not None and launch.worker_id == worker_id else None


def pop_status(client: Any, prefix: str, worker_id: str) -> StandbyStatus | None:
    raw = client.lpop(_ready(prefix, worker_id))
    return from_json(StandbyStatus, raw) if raw else None


def withdraw(client: Any, prefix: str, role: str, worker_id: str) -> None:
    """The succession is off (it failed, or this worker stops): its request and launch records go."""
    request = requests(client, prefix).get(role)
    if request is not None and request.worker_id == worker_id:
        client.pipeline(transaction=False).hdel(_requests(prefix), role).hdel(_standbys(prefix), role).execute()


def hand_over(pipe: Any, prefix: str, role: str, state: SuccessionState, old_pid: int,
              successor: StandbyLaunch) -> None:
    """The switch, queued on a MULTI pipeline: the state for the successor, the successor recorded for
    whoever follows the role's pid, the succession's records deleted."""
    key = _state(prefix, state.from_worker_id)
    pipe.rpush(key, to_json(state)).expire(key, KEY_TTL_S)
    pipe.hset(_successors(prefix), str(old_pid), f"{successor.pid}:{successor.start_time}")
    pipe.hdel(_requests(prefix), role)       # the launch record stays: the successor's command line, until the next


# ------------------------------------------------------------------------------- the standby

def request_of(client: Any, prefix: str, role: str, worker_id: str) -> StandbyRequest | None:
    """The request a standby was started for (None: withdrawn, or another worker's by now)."""
    request = requests(client, prefix).get(role)
    return request if request is not None and request.worker_id == worker_id else None


def signal_status(client: Any, prefix: str, worker_id: str, status: StandbyStatus) -> None:
    key = _ready(prefix, worker_id)
    client.pipeline(transaction=False).rpush(key, to_json(status)).expire(key, KEY_TTL_S).execute()


def wait_state(client: Any, prefix: str, worker_id: str, timeout_s: int) -> SuccessionState | None:
    got = client.blpop([_state(prefix, worker_id)], timeout=timeout_s)
    return from_json(SuccessionState, got[1]) if got is not None else None


# ------------------------------------------------------------------------- the supervisor

def requests(client: Any, prefix: str) -> dict[str, StandbyRequest]:
    return {k.decode() if isinstance(k, bytes) else k: from_json(StandbyRequest, v)
            for k, v in client.hgetall(_requests(prefix)).items()}


def standbys(client: Any, prefix: str) -> dict[str, StandbyLaunch]:
    return {k.decode() if isinstance(k, bytes) else k: from_json(StandbyLaunch, v)
            for k, v in client.hgetall(_standbys(prefix)).items()}


def record_launch(client: Any, prefix: str, role: str, launch: StandbyLaunch) -> None:
    client.hset(_standbys(prefix), role, to_json(launch))


def successors(client: Any, prefix: str) -> dict[int, tuple[int, int]]:
    """Old worker pid -> (successor pid, its start time), for every switch the stack has made."""
    return {int(k): tuple(int(x) for x in (v.decode() if isinstance(v, bytes) else v).split(":"))
            for k, v in client.hgetall(_successors(prefix)).items()}


def standby_argv(argv: tuple[str, ...], cpu_ids: tuple[int, ...], worker_id: str) -> tuple[str, ...]:
    """A role's recorded command line for its standby: the new cores, if any (CUDA: none, its host
    threads keep theirs), and --takeover-from; the values they replace are dropped."""
    kept = without_flags(argv, ("--cpus", TAKEOVER_FLAG) if cpu_ids else (TAKEOVER_FLAG,))
    cores = ("--cpus", ",".join(map(str, cpu_ids))) if cpu_ids else ()
    return (*kept, *cores, TAKEOVER_FLAG, worker_id)


def without_flags(argv: tuple[str, ...], flags: tuple[str, ...]) -> tuple[str, ...]:
    """`argv` without the flags named (`--flag value` and `--flag=value` alike)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.split("=", 1)[0] in flags:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return tuple(kept)


def standby_env(env: tuple[tuple[str, str], ...], mps_percentage: int) -> tuple[tuple[str, str], ...]:
    """A role's recorded environment for its standby: the new MPS percentage, when it has one."""
    if not mps_percentage:
        return env
    return (*((k, v) for k, v in env if k != PERCENTAGE_ENV), (PERCENTAGE_ENV, str(mps_percentage)))
