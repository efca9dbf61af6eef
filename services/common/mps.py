"""NVIDIA MPS (Multi-Process Service) control daemon: find one, start one, ask it, quit it.

The CUDA backend runs prefill and decode as two MPS clients of one GPU, each started with its
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (NVIDIA's MPS documentation: a client's limit is fixed when its
context is created). This module only talks to `nvidia-cuda-mps-control`, the documented interface:

  find      a daemon answers for a pipe directory when its pid file
            (`<pipe dir>/nvidia-cuda-mps-control.pid`, written by the daemon) names a live process
  start     `nvidia-cuda-mps-control -d` with CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY
            set to private (0700) directories, so it serves only the clients we point at it
  ask       commands go to the control program's stdin, one per line; it prints the daemon's answer:
            `get_server_list` -> one server pid per line; `get_client_list <server pid>` -> one client
            pid per line (an MPS server starts with its first client, so the list is empty before)
  quit      `quit`: the daemon stops its servers and exits. Only a daemon we started is quit.

Never here (nor anywhere in duoserve): the GPU's compute mode (`nvidia-smi -c`), clocks or MIG layout.
No torch, grpc or redis: the supervisor (`duoserve up/down`) imports this.
"""
from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

CONTROL_BINARY = "nvidia-cuda-mps-control"
PID_FILE = "nvidia-cuda-mps-control.pid"        # written by the daemon into its pipe directory
DEFAULT_PIPE_DIR = Path("/tmp/nvidia-mps")       # the daemon's pipe directory when none is set
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
QUERY_TIMEOUT_S = 10.0


class MpsError(RuntimeError):
    """The MPS control daemon is missing, refused a command, or answered something unexpected."""


@dataclass(frozen=True, slots=True)
class MpsDaemon:
    """The control daemon a stack's CUDA processes are clients of (kept in the stack's state file)."""

    pipe_dir: str            # CUDA_MPS_PIPE_DIRECTORY: daemon and clients meet here (must match)
    log_dir: str             # CUDA_MPS_LOG_DIRECTORY of a daemon we started; "" for one we found
    pid: int | None          # the control daemon's pid, from its pid file
    started_by_us: bool      # `duoserve down` quits the daemon only when the stack started it

    def client_env(self, percentage: int | None = None) -> dict[str, str]:
        """What a client process needs in its environment: the pipe dir, and its SM percentage."""
        env = {PIPE_ENV: self.pipe_dir}
        if self.log_dir:
            env[LOG_ENV] = self.log_dir
        if percentage is not None:
            env[PERCENTAGE_ENV] = str(check_percentage(percentage))
        return env


def check_percentage(percentage: int) -> int:
    """CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is an integer share of the SMs in (0, 100]."""
    if not isinstance(percentage, int) or not 1 <= percentage <= 100:
        raise ValueError(f"an MPS active thread percentage is an integer in 1..100, got {percentage!r}")
    return percentage


# ---------------------------------------------------------------------------------------------- commands

def daemon_argv(binary: str = CONTROL_BINARY) -> list[str]:
    """Start the control daemon in the background (it forks and returns)."""
    return [binary, "-d"]


def command_text(command: str, *args: int | str) -> str:
    """One control command as the daemon reads it on stdin: words separated by spaces, then a newline."""
    words = [command, *map(str, args)]
    if any(not w or any(c.isspace() for c in w) for w in words):
        raise ValueError(f"MPS command words may not be empty or hold spaces: {words!r}")
    return " ".join(words) + "\n"


def parse_pids(answer: str, command: str = "") -> list[int]:
    """The daemon's answer to get_server_list / get_client_list: one pid per line (blank lines skipped).
    Anything else is the daemon refusing the command, raised with its words."""
    pids = []
    for line in answer.splitlines():
        line = line.strip()
        if not line:
            continue
        if not line.isdigit():
            raise MpsError(f"MPS control daemon answered {command or 'a command'} with {answer.strip()!r}")
        pids.append(int(line))
    return pids


def control_env(pipe_dir: Path | str, log_dir: Path | str | None = None,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The control program's environment: ours (or `base`) with the daemon's directories."""
    env = dict(os.environ if base is None else base)
    env[PIPE_ENV] = str(pipe_dir)
    if log_dir:
        env[LOG_ENV] = str(log_dir)
    else:
        env.pop(LOG_ENV, None)
    return env


# ---------------------------------------------------------------------------------------------- daemon

def read_pid_file(pipe_dir: Path | str) -> int | None:
    try:
        text = (Path(pipe_dir) / PID_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                     # another user's daemon (root's): alive, though not ours
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def daemon_pid(pipe_dir: Path | str) -> int | None:
    """The pid of a live control daemon serving `pipe_dir`, else None."""
    pid = read_pid_file(pipe_dir)
    return pid if pid is not None and _alive(pid) else None


def query(pipe_dir: Path | str, command: str, *args: int | str, binary: str = CONTROL_BINARY,
          timeout_s: float = QUERY_TIMEOUT_S) -> str:
    """Send one command to the daemon of `pipe_dir`; its answer (stdout)."""
    text = command_text(command, *args)
    try:
        done = subprocess.run([binary], input=text, capture_output=True, text=True, timeout=timeout_s,
                              env=control_env(pipe_dir), check=False)
    except FileNotFoundError as e:
        raise MpsError(f"{binary} not found: the CUDA backend needs NVIDIA's MPS (part of the driver)") from e
    except subprocess.TimeoutExpired as e:
        raise MpsError(f"MPS control daemon of {pipe_dir} did not answer {command!r} in {timeout_s:g} s") from e
    if done.returncode != 0:
        raise MpsError(f"{binary} {command!r} failed (status {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


def server_list(pipe_dir: Path | str, binary: str = CONTROL_BINARY) -> list[int]:
    return parse_pids(query(pipe_dir, "get_server_list", binary=binary), "get_server_list")


def client_list(pipe_dir: Path | str, server_pid: int, binary: str = CONTROL_BINARY) -> list[int]:
    return parse_pids(query(pipe_dir, "get_client_list", server_pid, binary=binary), "get_client_list")


def all_clients(pipe_dir: Path | str, binary: str = CONTROL_BINARY) -> set[int]:
    """Every client pid of every MPS server of this daemon."""
    return {pid for server in server_list(pipe_dir, binary) for pid in client_list(pipe_dir, server, binary)}


def private_dir(path: Path) -> Path:
    """`path` (and missing parents, each) mode 0700, ours, and a real directory; else PermissionError."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        missing.mkdir(mode=0o700, exist_ok=True)      # mkdir(parents=True) would give parents the umask's mode
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory of ours: refusing it as an MPS directory")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def start_daemon(pipe_dir: Path, log_dir: Path, binary: str = CONTROL_BINARY,
                 timeout_s: float = QUERY_TIMEOUT_S) -> MpsDaemon:
    """Start a control daemon on private directories and wait until it answers."""
    private_dir(pipe_dir)
    private_dir(log_dir)
    if daemon_pid(pipe_dir) is not None:
        raise MpsError(f"an MPS control daemon already serves {pipe_dir}")
    # Its output goes to a file, not a pipe: the forked daemon may keep the descriptors open, and
    # reading a pipe to its end would then wait for the daemon to exit.
    with tempfile.TemporaryFile() as out:
        try:
            done = subprocess.run(daemon_argv(binary), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  timeout=timeout_s, env=control_env(pipe_dir, log_dir), check=False)
        except FileNotFoundError as e:
            raise MpsError(f"{binary} not found: the CUDA backend needs NVIDIA's MPS (part of the driver)") from e
        out.seek(0)
        said = out.read().decode(errors="replace").strip()
    if done.returncode != 0:
        raise MpsError(f"`{binary} -d` failed (status {done.returncode}): {said}; see {log_dir}/control.log")
    deadline = time.monotonic() + timeout_s
    while (pid := daemon_pid(pipe_dir)) is None:
        if time.monotonic() > deadline:
            raise MpsError(f"the MPS control daemon wrote no pid file in {pipe_dir} within {timeout_s:g} s; "
                           f"see {log_dir}/control.log")
        time.sleep(0.05)
    server_list(pipe_dir, binary)            # answers: ready for clients
    return MpsDaemon(str(pipe_dir), str(log_dir), pid, started_by_us=True)


def ensure_daemon(candidates: Iterable[Path], pipe_dir: Path, log_dir: Path,
                  binary: str = CONTROL_BINARY) -> MpsDaemon:
    """A running daemon on one of `candidates` (the operator's pipe directories) is used as it is;
    else one is started on the private `pipe_dir`/`log_dir`."""
    for candidate in candidates:
        pid = daemon_pid(candidate)
        if pid is not None:
            server_list(candidate, binary)   # it must answer us, not only exist
            return MpsDaemon(str(candidate), "", pid, started_by_us=False)
    return start_daemon(pipe_dir, log_dir, binary)


def wait_for_clients(daemon: MpsDaemon, pids: Iterable[int], timeout_s: float = 30.0,
                     binary: str = CONTROL_BINARY) -> set[int]:
    """Wait until every pid is a client of the daemon's servers; raise MpsError naming those that are not."""
    wanted = set(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        clients = all_clients(daemon.pipe_dir, binary)
        if wanted <= clients:
            return clients
        if time.monotonic() > deadline:
            raise MpsError(f"processes {sorted(wanted - clients)} are not clients of the MPS daemon of "
                           f"{daemon.pipe_dir} (its clients: {sorted(clients)}): did they start with "
                           f"{PIPE_ENV}={daemon.pipe_dir}?")
        time.sleep(0.2)


def quit_daemon(daemon: MpsDaemon, timeout_s: float = QUERY_TIMEOUT_S, binary: str = CONTROL_BINARY) -> bool:
    """`quit` a daemon this stack started; True once it has exited. A daemon we found is left alone."""
    if not daemon.started_by_us:
        return False
    pid = daemon_pid(daemon.pipe_dir)
    if pid is None or (daemon.pid is not None and pid != daemon.pid):
        return True                          # already gone (or a different daemon now: not ours)
    query(daemon.pipe_dir, "quit", binary=binary, timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
