"""`python -m duoserve.reaper CMD [ARG...]`: a worker container's main process, and its supervisor for
retunes by succession.

A worker changes its share by succession (always on cuda: an MPS client's limit is fixed): it asks for
a standby at the new share, which takes over and outlives it (services/common/succession.py). Under
`duoserve up` the stack's supervisor starts that standby; compose runs no supervisor, and Docker watches
one process per container. So a worker container runs this instead:

  start    CMD in a new session (its own process group), and this process becomes the child subreaper
           of everything below it (prctl PR_SET_CHILD_SUBREAPER): an orphan is re-parented here
  retune   every TICK_S, when CMD is a split worker and its Redis answers: a StandbyRequest of a
           worker it started is answered as the supervisor answers it: CMD with the new cores (or
           CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) and --takeover-from, in a session of its own, and
           recorded (StandbyLaunch); the worker watches its standby's pid itself
  running  SIGTERM, SIGINT and SIGHUP are passed on to the process group of every worker it started,
           so `docker stop` drains whichever worker serves now, and a standby with it
  exit     when no descendant is left, with the status of the last one to end (128+N for signal N)
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from duoserve.credentials import redis_url_from_env
from services.common import succession as wire
from services.common.pids import process_start_time

PR_SET_CHILD_SUBREAPER = 36            # <linux/prctl.h>
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TICK_S = 0.5                           # how often it looks for a standby request (as the supervisor does)
ROLES = ("prefill", "decode")          # workers that retune by succession

log = logging.getLogger("duoserve.reaper")


@dataclass(frozen=True, slots=True)
class ReaperConfig:
    """Built once in `main` from CMD and the environment it passes on."""

    argv: tuple[str, ...]              # the worker's command line
    role: str = ""                     # prefill | decode when CMD is one (`python -m services.<role>.main`)
    redis_url: str | None = None       # the worker's Redis (its --redis-url, else REDIS_URL)
    key_prefix: str = "duo"            # its --key-prefix, else DUOSERVE_KEY_PREFIX

    @staticmethod
    def of(argv: Sequence[str], env: Mapping[str, str]) -> ReaperConfig:
        def flag(name: str) -> str | None:
            for i, arg in enumerate(argv):
                if arg == name and i + 1 < len(argv):
                    return argv[i + 1]
                if arg.startswith(name + "="):
                    return arg.split("=", 1)[1]
            return None
        role = next((r for r in ROLES if f"services.{r}.main" in argv), "")
        return ReaperConfig(tuple(argv), role, redis_url_from_env(env, flag("--redis-url") or env.get("REDIS_URL")),
                            flag("--key-prefix") or env.get("DUOSERVE_KEY_PREFIX") or "duo")


class ContainerStandbys:
    """Answers the StandbyRequests of the workers it started (services/common/succession.py)."""

    def __init__(self, config: ReaperConfig, client: Any) -> None:
        self.config, self.client = config, client
        self.started: list[int] = []            # CMD's pid, then every standby's: each leads its own group

    def tick(self) -> None:
        request = wire.requests(self.client, self.config.key_prefix).get(self.config.role)
        if request is None or wire.launch_for(self.client, self.config.key_prefix, request.role,
                                              request.worker_id) is not None:
            return
        if request.pid not in self.started or process_start_time(request.pid) != request.start_time:
            return                                     # not one of ours
        argv = wire.standby_argv(self.config.argv, request.cpu_ids, request.worker_id)
        env = {**os.environ, **dict(wire.standby_env((), request.mps_percentage))}
        pid = os.posix_spawnp(argv[0], list(argv), env, setsid=True)   # (a group of another session is
        self.started.append(pid)                                         # not one a child may join)
        wire.record_launch(self.client, self.config.key_prefix, request.role, wire.StandbyLaunch(
            request.worker_id, pid, process_start_time(pid) or 0, wire.without_flags(argv, (wire.TAKEOVER_FLAG,)),
            request.mps_percentage))
        log.info("%s: standby pid %d started for %s (retune by succession)", request.role, pid, request.worker_id)


def standbys_for(config: ReaperConfig) -> ContainerStandbys | None:
    """A split worker's standby launcher, or None (another command, or no Redis URL to find requests in)."""
    if not config.role or not config.redis_url:
        return None
    import redis
    return ContainerStandbys(config, redis.Redis.from_url(config.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0))


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code           # killed by signal N: 128+N, as a shell reports it


def run(argv: Sequence[str], standbys: ContainerStandbys | None = None) -> int:
    """Run `argv` and every process it leaves behind (or `standbys` starts) to the end; returns the exit
    status to use."""
    become_subreaper()
    groups: list[int] = standbys.started if standbys else []   # each worker's process group, once started
    pending: list[int] = []                            # signals that came before it started

    def forward(signum: int, _frame) -> None:
        if not groups:
            pending.append(signum)
            return
        for group in list(groups):
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass                                   # every member already gone: wait() will say so

    for sig in FORWARDED:
        signal.signal(sig, forward)
    pid = os.posix_spawnp(argv[0], list(argv), os.environ, setsid=True)
    groups.append(pid)                                 # a session leader's pgid is its pid
    for signum in pending:
        forward(signum, None)
    last = 0
    while True:
        try:
            done, status = os.waitpid(-1, os.WNOHANG if standbys else 0)   # children, and orphans re-parented
        except ChildProcessError:
            return last
        if done:
            last = exit_code(status)
            continue
        try:
            standbys.tick()
        except Exception as e:                         # noqa: BLE001: Redis away; the worker times out and stays
            log.warning("standby requests: %s", e)
        time.sleep(TICK_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reaper %(message)s")
    return run(args, standbys_for(ReaperConfig.of(args, os.environ)))


if __name__ == "__main__":
    sys.exit(main())
