"""`python -m duoserve.reaper CMD [ARG...]`: a worker container's main process, so a handover survives.

A worker changes its share by handover (always on cuda: an MPS client's limit is fixed) by starting its
successor and then exiting (services.worker.handover). Docker watches one process per container: when
it exits, the container stops and the successor dies with it. So a worker container runs this instead:

  start    CMD in a new session (its own process group; a successor joins that group), and this
           process becomes the child subreaper of everything below it (prctl PR_SET_CHILD_SUBREAPER):
           an orphaned successor is re-parented here, not to the container's init
  running  SIGTERM, SIGINT and SIGHUP are passed on to the whole group, so `docker stop` drains
           whichever worker serves now, and a standby with it
  exit     when no descendant is left, with the status of the last one to end (128+N for signal N)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Sequence

PR_SET_CHILD_SUBREAPER = 36            # <linux/prctl.h>
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code           # killed by signal N: 128+N, as a shell reports it


def run(argv: Sequence[str]) -> int:
    """Run `argv` and every process it leaves behind to the end; returns the exit status to use."""
    become_subreaper()
    group: list[int] = []                              # the command's process group, once started
    pending: list[int] = []                            # signals that came before it started

    def forward(signum: int, _frame) -> None:
        if not group:
            pending.append(signum)
            return
        try:
            os.killpg(group[0], signum)
        except ProcessLookupError:
            pass                                       # every member already gone: wait() will say so

    for sig in FORWARDED:
        signal.signal(sig, forward)
    pid = os.posix_spawnp(argv[0], list(argv), os.environ, setsid=True)
    group.append(pid)                                  # a session leader's pgid is its pid
    for signum in pending:
        forward(signum, None)
    last = 0
    while True:
        try:
            _, status = os.wait()                      # children, and orphans re-parented to us
        except ChildProcessError:
            return last
        last = exit_code(status)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if args else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
