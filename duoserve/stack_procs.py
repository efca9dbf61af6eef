"""The stack's state file and the processes it records: start times, signals, ports, health checks,
log tails and leftover shared memory. Used by `duoserve.stack` (up, down, status)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from duoserve.credentials import url_password
from services.common import succession
from services.common.pids import process_start_time  # noqa: F401 (re-exported: duoserve.stack)
from duoserve.pairs import name_in_pair, pair_key_prefix, pair_socket, pair_stack_id, role_of
from duoserve.stack_plan import LOOPBACK, SHM_DIR, STATE_VERSION, HEALTHY, SUCCESSION_NAMES, StackError


# ---------------------------------------------------------------------------------------------
# The state file
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One launched process, as `down` and `status` find it."""

    name: str
    pid: int
    start_time: int | None         # /proc/<pid>/stat starttime: tells it from a recycled pid
    stage: int                     # start order; stopped in reverse
    port: int
    metrics_port: int
    health: str                    # "grpc" or "redis"
    log: str                       # its stdout and stderr
    argv: tuple[str, ...]
    http_port: int = 0             # gateway: the OpenAI-compatible HTTP API (0: none)
    env: tuple[tuple[str, str], ...] = ()   # its own environment on top of the launcher's (a restart
                                            # uses it again; the state file is readable by its owner only)
    restarts: int = 0              # times the supervisor restarted it

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"


@dataclass(frozen=True, slots=True)
class StackState:
    """Everything needed to find, check and stop a stack from another process."""

    name: str
    mode: str
    stack_id: str
    key_prefix: str
    segment_prefix: str
    redis_url: str
    owns_redis: bool               # False: an external Redis (only our keys are deleted at `down`)
    arena_socket: str | None
    gateway_target: str | None     # set once the gateway is launched
    supervisor_pid: int | None     # a foreground `up` watching the stack (None when detached)
    supervisor_start_time: int | None
    created_at: float
    processes: tuple[ProcessRecord, ...] = ()
    version: int = STATE_VERSION
    device: str = "cpu"            # where the model runs
    mps: dict | None = None        # cuda split: asdict(services.common.mps.MpsDaemon); `down` quits it if ours
    http_url: str | None = None    # the gateway's OpenAI-compatible HTTP API, http(s)://HOST:PORT (None: off)
    secret_file: str | None = None # the stack's secret (duoserve.credentials); None: started with --no-auth
    tls_cert: str | None = None    # the gateway's and the orchestrator's certificate (None: no TLS)
    pairs: int = 1                 # arena + prefill + decode + orchestrator sets (duoserve/pairs.py)

    def pair_segment_prefix(self, pair: int) -> str:
        """/dev/shm names of pair `pair`'s memory ("duoserve-<id>-" for a one-pair stack)."""
        return self.segment_prefix if self.pairs == 1 else f"duoserve-{pair_stack_id(self.stack_id, pair, self.pairs)}-"

    def pair_arena_socket(self, pair: int) -> str | None:
        return None if self.arena_socket is None else str(pair_socket(Path(self.arena_socket), pair, self.pairs))

    def pair_key_prefix(self, pair: int) -> str:
        return pair_key_prefix(self.key_prefix, pair, self.pairs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> StackState:
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise StackError(f"state file version {data.get('version')!r} is not {STATE_VERSION}")
        procs = tuple(ProcessRecord(**{**p, "argv": tuple(p["argv"]), "env": tuple(tuple(kv) for kv in p.get("env", ()))})
                      for p in data.pop("processes"))
        return StackState(**data, processes=procs)


def write_state(path: Path, state: StackState) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one. Mode 0600: it holds
    the processes' environments."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
    os.replace(tmp, path)


def read_state(path: Path) -> StackState | None:
    try:
        return StackState.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise StackError(f"unreadable state file {path}: {e}; remove it after checking nothing runs") from e


def make_stack_dir(stack_dir: Path) -> None:
    """Mode 0700: it holds the arena socket, which the arena refuses to put where others can enter."""
    stack_dir.parent.mkdir(parents=True, exist_ok=True)
    stack_dir.mkdir(mode=0o700, exist_ok=True)
    if stack_dir.stat().st_mode & 0o077:
        stack_dir.chmod(0o700)


@contextlib.contextmanager
def stack_lock(stack_dir: Path):
    """One `up` or `down` at a time per stack name."""
    make_stack_dir(stack_dir)
    with open(stack_dir / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Processes, ports, health
# ---------------------------------------------------------------------------------------------

def launch_process(argv: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start one of the stack's processes: its own session (signalled as a group), stdin closed, stdout and
    stderr appended to its log after a line with the time and command. Raises OSError."""
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True,
                                close_fds=True)


def is_alive(pid: int | None, start_time: int | None) -> bool:
    if not pid:
        return False
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def follow_successions(state: StackState) -> StackState:
    """The stack as it is after retunes by succession (services/common/succession.py): a worker
    replaced by a successor the supervisor started, recorded at the switch as "old pid" -> "new
    pid:start time" in Redis. Each worker record follows that chain: its live processes take its place,
    the successor with the command line and environment it was started with (the role's from then
    on); mid-succession a live standby is listed beside the worker, so `down` stops it too. Best
    effort: without Redis, unchanged."""
    if not any(role_of(r.name) in SUCCESSION_NAMES for r in state.processes):
        return state
    try:
        import redis
        client = redis.Redis.from_url(state.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        successors: dict[int, tuple[int, int]] = {}        # pids: unique across the pairs
        standbys: dict[str, succession.StandbyLaunch] = {}   # by process name
        try:
            for pair in range(state.pairs):                  # each pair's successions under its own keys
                successors.update(succession.successors(client, state.pair_key_prefix(pair)))
                for role, launch in succession.standbys(client, state.pair_key_prefix(pair)).items():
                    standbys[name_in_pair(role, pair, state.pairs)] = launch
        finally:
            client.close()
    except Exception:          # noqa: BLE001: Redis gone; the state file is all there is
        return state
    records: list[ProcessRecord] = []
    for r in state.processes:
        if any(k.pid == r.pid for k in records):
            continue                                     # already there: a standby the file listed, now followed
        if role_of(r.name) not in SUCCESSION_NAMES:
            records.append(r)
            continue
        launch = standbys.get(r.name)
        chain = [r]
        while chain[-1].pid in successors and len(chain) < 1000:
            pid, start = successors[chain[-1].pid]
            chain.append(as_launched(r, launch) if launch is not None and launch.pid == pid
                         else replace(r, pid=pid, start_time=start))
        live = [c for c in chain if is_alive(c.pid, c.start_time)]
        if launch is not None and launch.pid not in {c.pid for c in chain} and is_alive(launch.pid, launch.start_time):
            live.append(as_launched(r, launch))          # mid-succession: the standby beside its worker
        records.extend(c for c in (live or chain[-1:]) if not any(k.pid == c.pid for k in records))
    return replace(state, processes=tuple(records))


def as_launched(record: ProcessRecord, launch: succession.StandbyLaunch) -> ProcessRecord:
    """A role's record for the standby started for it: its pid, command line and MPS percentage."""
    return replace(record, pid=launch.pid, start_time=launch.start_time, argv=launch.argv or record.argv,
                   env=succession.standby_env(record.env, launch.mps_percentage))


def _reap(pid: int) -> None:
    """Collect our own exited child so it stops being a zombie; others' pids are left alone."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_process(pid: int, start_time: int | None, sig: int, group: bool = True) -> None:
    """Signal a live process, and with `group` its process group when it leads one (our launches do)."""
    if not is_alive(pid, start_time):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_processes(procs: Iterable[tuple[int, int | None]], timeout_s: float, graceful: bool = True) -> list[int]:
    """SIGTERM, wait up to `timeout_s`, SIGKILL what is left; returns the pids that needed SIGKILL.
    `graceful` False: SIGKILL at once, no clean-up runs (a worker's requests stay pending in Redis
    for its successor instead of being ended)."""
    procs = [p for p in procs if is_alive(*p)]
    left = procs
    if graceful:
        for pid, start in procs:
            signal_process(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while True:
            for pid, _ in procs:
                _reap(pid)
            left = [p for p in procs if is_alive(*p)]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    for pid, start in left:
        signal_process(pid, start, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(is_alive(*p) for p in left) and time.monotonic() < deadline:
        for pid, _ in left:
            _reap(pid)
        time.sleep(0.02)
    return [pid for pid, _ in left]


def pick_free_ports(n: int, avoid: Iterable[int] = ()) -> list[int]:
    """`n` distinct loopback ports free right now (bound to port 0 together, then released)."""
    avoid = set(avoid)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def port_in_use(port: int) -> bool:
    """Whether something still holds `port` on the loopback (a bind to it fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def bindable(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as gRPC and uvicorn set it, so a
    port a stopped stack left in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def grpc_health(target: str, timeout_s: float = 1.0, tls_cert: str | Path | None = None) -> str:
    """The grpc.health.v1 status of the server's overall service "", or why there is none. With
    `tls_cert`, over TLS, trusting that certificate (the stack's own, whatever host it names)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    import grpc
    from duoserve.channel import certificate_name, open_channel

    name = certificate_name(tls_cert) if tls_cert else None
    with open_channel(target, tls=tls_cert, server_name=name, options=(("grpc.enable_http_proxy", 0),)) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code()
            return "UNREACHABLE" if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                else code.name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def redis_health(port: int, timeout_s: float = 1.0, pid: int | None = None, password: str | None = None) -> str:
    """SERVING when PING answers (from process `pid`, if given: not a server that took the port first),
    NOT_SERVING while it loads its data, else UNREACHABLE."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                         password=password, retry=Retry(NoBackoff(), 0))   # one probe, no hidden backoff
    try:
        client.ping()
        if pid is not None and int(client.info("server")["process_id"]) != pid:
            return "UNREACHABLE"
        return HEALTHY
    except redis.BusyLoadingError:
        return "NOT_SERVING"
    except redis.RedisError:
        return "UNREACHABLE"
    finally:
        client.close()


def health_of(kind: str, port: int, timeout_s: float = 1.0, pid: int | None = None, *,
              password: str | None = None, tls_cert: str | Path | None = None) -> str:
    """A process's health by its kind: "redis" (PING, with the stack's password), "grpc", "grpc-tls"."""
    if kind == "redis":
        return redis_health(port, timeout_s, pid, password)
    return grpc_health(f"{LOOPBACK}:{port}", timeout_s, tls_cert if kind == "grpc-tls" else None)


def record_health(record: ProcessRecord, state: StackState, timeout_s: float = 1.0) -> str:
    """health_of one recorded process, with what the state file says it takes to ask it."""
    return health_of(record.health, record.port, timeout_s, record.pid,
                     password=url_password(state.redis_url) if state.owns_redis else None, tls_cert=state.tls_cert)


def log_tail(path: Path | str, lines: int = 30, since: int = 0) -> str:
    """The last `lines` lines of a log, reading no further back than byte `since`."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def remove_segments(prefix: str) -> list[str]:
    """Unlink every POSIX shared-memory segment whose name starts with `prefix`."""
    if not prefix.startswith("duoserve-") or len(prefix) <= len("duoserve-"):
        raise ValueError(f"refusing to remove segments by the broad prefix {prefix!r}")
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def arena_memory(prefix: str) -> frozenset[tuple[str, int]]:
    """(kind, inode) of the stack's weights and KV segments: equal before and after an arena's
    restart when the new arena re-opened the memory the workers map."""
    found = set()
    for path in SHM_DIR.glob(f"{prefix}*") if prefix else ():
        kind = path.name.rsplit("-", 1)[-1]
        if kind in ("weights", "kv"):
            with contextlib.suppress(FileNotFoundError):
                found.add((kind, path.stat().st_ino))
    return frozenset(found)


def find_redis_server() -> str | None:
    try:
        from services.common.redis_server import find_redis_server
    except ImportError:
        return shutil.which("redis-server")
    try:
        found = find_redis_server()
    except (FileNotFoundError, RuntimeError):
        return None
    return str(found) if found else None
