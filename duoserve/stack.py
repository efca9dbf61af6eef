"""The stack supervisor behind `duoserve up`, `duoserve down` and `duoserve status`.

A stack's life:
  planned    a frozen StackConfig becomes stages of ProcessSpec, each with free loopback ports:
             split: redis -> arena -> prefill + decode -> gateway; colocated: redis -> colocated -> gateway
             (redis only when no external Redis URL is given)
  starting   each stage is launched (own session, output to <stack dir>/logs/<name>.log; the state file
             is rewritten after every launch, so `down` can clean up a half-started stack), then waited on
             until every grpc.health.v1 check says SERVING. A process that exits on a port collision is
             relaunched on new ports; one that exits otherwise, or misses the deadline, stops the start:
             everything started is torn down and the error shows that process's log tail
  running    detached: the state file is the only record and `up` returns; foreground: `up` watches its
             processes until Ctrl-C / SIGTERM / SIGHUP, a process dying, or `duoserve down`
  stopped    stages in reverse order: SIGTERM, wait, SIGKILL; the Redis it started stopped (an external
             one only loses this stack's keys); /dev/shm/duoserve-<stack id>-* segments, the arena socket
             and the state file removed. The logs stay.

--device cuda (split): before the arena, an MPS control daemon already serving the operator's pipe
directory is used, else one is started on private directories (<stack dir>/mps, logs/mps); the arena
and both workers are its clients (the workers each with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), which is
checked once they are SERVING. `down` quits the daemon only if this stack started it.

One directory per stack name: <state dir>/<name>/{state.json, logs/, redis/, arena.sock, lock}.
A pid in the state file is trusted only together with its start time (from /proc), so a recycled pid
is never signalled. No torch here: `duoserve status` and `down` are instant.
"""
from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, TextIO

from services.common import mps

LOOPBACK = "127.0.0.1"
SHM_DIR = Path("/dev/shm")
STATE_FILE = "state.json"
STATE_VERSION = 1
PORT_RETRIES = 3                   # relaunches of one process after a port collision
UNIX_SOCKET_PATH_MAX = 100         # sun_path is 108 bytes on Linux; leave room
BIND_FAILURES = ("address already in use", "cannot listen on", "failed to bind", "errno 98",
                 "could not create server tcp listening socket")
HEALTHY = "SERVING"
HANDOVER_NAMES = ("prefill", "decode")   # workers that may replace themselves (retune by handover)


class StackError(RuntimeError):
    """Something a person has to act on: a stack already running, a process that failed to start."""


class Mode(enum.Enum):
    SPLIT = "split"            # prefill and decode in separate processes over the arena's memory
    COLOCATED = "colocated"    # one engine doing chunked-prefill hybrid batches (the baseline)


@dataclass(frozen=True, slots=True)
class StackConfig:
    """One `duoserve up`: what to run. Built once by the CLI (the only reader of the environment)."""

    state_dir: Path                          # parent of every stack's directory
    cache_dir: Path                          # converted checkpoints
    name: str = "default"                    # several stacks can run side by side under different names
    mode: Mode = Mode.SPLIT
    redis_url: str | None = None             # external Redis (never started or stopped); None: start one
    model: str | None = None                 # None: the default model
    dtype: str = "float32"
    num_kv_blocks: int | None = None         # KV pool size (None: the arena's / worker's memory budget)
    cpus: tuple[int, ...] = ()               # the stack's cores (empty: all this process may use)
    prefill_cpus: tuple[int, ...] = ()       # split: prefill's initial cores (empty: first half of `cpus`)
    decode_cpus: tuple[int, ...] = ()        # split: decode's initial cores (empty: second half of `cpus`)
    max_num_seqs: int | None = None          # worker limits; None keeps the worker's default
    max_num_batched_tokens: int | None = None
    chunk_size: int | None = None            # colocated: prompt tokens per hybrid iteration
    max_queue_len: int | None = None         # gateway: waiting requests before RESOURCE_EXHAUSTED
    startup_timeout_s: float = 600.0         # from the first launch to every process SERVING
    stop_timeout_s: float = 10.0             # SIGTERM -> SIGKILL, per stage
    with_orchestrator: bool = True           # split: run the orchestrator (SLO-aware shares, Admin API)
    admin_token: str = ""                    # Admin API bearer token (handed over in the environment)
    python: str = sys.executable             # interpreter of the service processes
    redis_server: str | None = None          # redis-server binary (None: looked up on PATH)
    device: str = "cpu"                      # "cpu" or "cuda" (cuda:0; split mode runs under MPS)
    prefill_percentage: int = 50             # cuda split: prefill's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (a cap)
    decode_percentage: int = 50              # cuda split: decode's
    mps_pipe_dir: Path | None = None         # cuda: a running MPS daemon's pipe dir to use (else the default
                                             # /tmp/nvidia-mps, else a private daemon is started)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise ValueError(f"stack name {self.name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        available = os.sched_getaffinity(0)
        for what, cpus in (("cpus", self.cpus), ("prefill cpus", self.prefill_cpus),
                           ("decode cpus", self.decode_cpus)):
            if any(c not in available for c in cpus):
                raise ValueError(f"{what} {list(cpus)} not all available to this process ({sorted(available)})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s < 0:
            raise ValueError("startup timeout must be positive and stop timeout not negative")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        mps.check_percentage(self.prefill_percentage)
        mps.check_percentage(self.decode_percentage)

    @property
    def uses_mps(self) -> bool:
        """cuda split: prefill and decode share the GPU as MPS clients."""
        return self.device == "cuda" and self.mode is Mode.SPLIT

    @property
    def stack_dir(self) -> Path:
        return self.state_dir / self.name

    @property
    def state_path(self) -> Path:
        return self.stack_dir / STATE_FILE

    def worker_cpus(self) -> dict[str, tuple[int, ...]]:
        """Each worker's initial cores: split halves the stack's cores (2 cores: prefill 0, decode 1)."""
        pool = self.cpus or tuple(sorted(os.sched_getaffinity(0)))
        if self.mode is Mode.COLOCATED:
            return {"colocated": pool}
        half = max(1, len(pool) // 2)
        return {"prefill": self.prefill_cpus or pool[:half],
                "decode": self.decode_cpus or (pool[half:] or pool[-1:])}


@dataclass(frozen=True, slots=True)
class Layout:
    """What one `up` invents for its stack before anything starts."""

    stack_id: str                  # unique per `up`: names the shared memory and the Redis key space
    key_prefix: str                # Redis keys of this stack: "<key_prefix>:..."
    segment_prefix: str            # /dev/shm names of this stack: "duoserve-<stack_id>-"
    arena_socket: Path             # where the arena hands out its segments (split mode)
    mps: mps.MpsDaemon | None = None   # cuda split: the MPS daemon the arena and workers are clients of

    @staticmethod
    def new(stack_dir: Path) -> Layout:
        stack_id = uuid.uuid4().hex[:10]
        sock = stack_dir / "arena.sock"
        if len(str(sock)) > UNIX_SOCKET_PATH_MAX:     # a deep state dir: sun_path is short
            sock = Path("/tmp") / f"duoserve-{os.getuid()}" / stack_id / "arena.sock"   # as the arena's default
        return Layout(stack_id, f"duo:{stack_id}", f"duoserve-{stack_id}-", sock)

    def private_mps_pipe_dir(self) -> Path:
        """Where a daemon this stack starts listens: beside the arena socket (short, private)."""
        return self.arena_socket.parent / "mps"


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """One process to launch: the plan's unit."""

    name: str                      # redis, arena, prefill, decode, colocated, gateway
    argv: tuple[str, ...]          # full command line
    port: int                      # what its health check asks (redis: its own port)
    metrics_port: int              # Prometheus /metrics (0: none)
    health: str = "grpc"           # "grpc": grpc.health.v1 Check; "redis": PING
    env: tuple[tuple[str, str], ...] = ()   # extra environment (secrets stay off the command line)

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"


# ---------------------------------------------------------------------------------------------
# The plan (pure: no processes, no sockets)
# ---------------------------------------------------------------------------------------------

def stage_names(config: StackConfig) -> tuple[tuple[str, ...], ...]:
    """Start order; processes within a stage start together."""
    redis = () if config.redis_url else (("redis",),)
    if config.mode is Mode.COLOCATED:
        return redis + (("colocated",), ("gateway",))
    last = ("gateway", "orchestrator") if config.with_orchestrator else ("gateway",)
    return redis + (("arena",), ("prefill", "decode"), last)


def redis_url_of(config: StackConfig, ports: dict[str, tuple[int, int]]) -> str:
    return config.redis_url or f"redis://{LOOPBACK}:{ports['redis'][0]}/0"


def plan(config: StackConfig, layout: Layout,
         ports: dict[str, tuple[int, int]]) -> list[list[ProcessSpec]]:
    """Every process of the stack, in stages. `ports[name]` is (port, metrics port)."""
    return [[process_spec(name, config, layout, ports) for name in stage] for stage in stage_names(config)]


def process_spec(name: str, config: StackConfig, layout: Layout,
                 ports: dict[str, tuple[int, int]]) -> ProcessSpec:
    port, metrics_port = ports[name]
    redis_url = redis_url_of(config, ports)
    common = ("--redis-url", redis_url, "--key-prefix", layout.key_prefix,
              "--port", str(port), "--metrics-port", str(metrics_port))
    py = (config.python, "-m")
    model = ("--model", config.model) if config.model else ()
    kv = ("--num-kv-blocks", str(config.num_kv_blocks)) if config.num_kv_blocks else ()
    if name == "redis":
        argv = (config.redis_server or "redis-server", "--bind", LOOPBACK, "--port", str(port),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
                "--dir", str(config.stack_dir / "redis"))
        return ProcessSpec(name, argv, port, 0, health="redis")
    device = ("--device", config.device) if config.device != "cpu" else ()
    if name == "arena":
        argv = py + ("services.arena.main", *common, *model, "--cache-dir", str(config.cache_dir),
                     "--dtype", config.dtype, *kv, "--stack-id", layout.stack_id,
                     "--socket", str(layout.arena_socket), *device)
        # An MPS client too (no compute, no limit): its allocations are the ones the workers open.
        env = tuple(layout.mps.client_env().items()) if layout.mps else ()
        return ProcessSpec(name, argv, port, metrics_port, env=env)
    if name in ("prefill", "decode", "colocated"):
        limits: list[str] = []
        for flag, value in (("--max-num-seqs", config.max_num_seqs),
                            ("--max-num-batched-tokens", config.max_num_batched_tokens),
                            ("--chunk-size", config.chunk_size)):
            if value is not None:
                limits += [flag, str(value)]
        cpus = ",".join(map(str, config.worker_cpus()[name]))
        where = (("--arena-socket", str(layout.arena_socket)) if name != "colocated"
                 else (*model, "--dtype", config.dtype, *kv))
        argv = py + (f"services.{name}.main", *common, *where, "--cache-dir", str(config.cache_dir),
                     "--cpus", cpus, *limits, *device)
        # Idle OpenMP threads sleep instead of spinning: two workers share cores (and a busy machine's
        # cores), and a spinning thread that loses its core stalls its siblings.
        env = (("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE")),)
        if layout.mps and name != "colocated":      # its SM cap, fixed when its CUDA context is created
            percentage = config.prefill_percentage if name == "prefill" else config.decode_percentage
            env += tuple(layout.mps.client_env(percentage).items())
        return ProcessSpec(name, argv, port, metrics_port, env=env)
    if name == "gateway":
        queue = ("--max-queue-len", str(config.max_queue_len)) if config.max_queue_len else ()
        return ProcessSpec(name, py + ("services.gateway.main", *common, *queue), port, metrics_port)
    if name == "orchestrator":
        cpus = ",".join(map(str, config.cpus or tuple(sorted(os.sched_getaffinity(0)))))
        env = (("DUOSERVE_ADMIN_TOKEN", config.admin_token),) if config.admin_token else ()
        return ProcessSpec(name, py + ("orchestrator.main", *common, "--cpus", cpus), port, metrics_port, env=env)
    raise ValueError(f"unknown process {name!r}")


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_json(text: str) -> StackState:
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise StackError(f"state file version {data.get('version')!r} is not {STATE_VERSION}")
        procs = tuple(ProcessRecord(**{**p, "argv": tuple(p["argv"])}) for p in data.pop("processes"))
        return StackState(**data, processes=procs)


def write_state(path: Path, state: StackState) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(state.to_json())
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

def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (None if gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])                            # field 22 of proc(5)


def is_alive(pid: int | None, start_time: int | None) -> bool:
    if not pid:
        return False
    now = process_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def follow_handovers(state: StackState) -> StackState:
    """The stack as it is after retunes by handover (services/worker/handover.py): a worker replaced
    itself with a successor it started, recording "old pid" -> "new pid:start time" in Redis
    (`<key_prefix>:successors`). Each worker record follows that chain: its live processes take its
    place (mid-handover, the old worker and its standby both). Best effort: without Redis, unchanged."""
    if not any(r.name in HANDOVER_NAMES for r in state.processes):
        return state
    try:
        import redis
        client = redis.Redis.from_url(state.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        raw = client.hgetall(f"{state.key_prefix}:successors")
        client.close()
    except Exception:          # noqa: BLE001: Redis gone; the state file is all there is
        return state
    successors = {int(k): tuple(int(x) for x in v.split(b":")) for k, v in raw.items()}
    records: list[ProcessRecord] = []
    for r in state.processes:
        chain = [r]
        while r.name in HANDOVER_NAMES and chain[-1].pid in successors and len(chain) < 1000:
            pid, start = successors[chain[-1].pid]
            chain.append(replace(r, pid=pid, start_time=start))
        live = [c for c in chain if is_alive(c.pid, c.start_time)]
        records.extend(live or chain[-1:])
    return replace(state, processes=tuple(records))


def _reap(pid: int) -> None:
    """Collect our own exited child so it stops being a zombie; others' pids are left alone."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, start_time: int | None, sig: int, group: bool = True) -> None:
    """Signal a live process, and with `group` its process group when it leads one (our launches do)."""
    if not is_alive(pid, start_time):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def stop_processes(procs: Iterable[tuple[int, int | None]], timeout_s: float) -> list[int]:
    """SIGTERM, wait up to `timeout_s`, SIGKILL what is left; returns the pids that needed SIGKILL."""
    procs = [p for p in procs if is_alive(*p)]
    for pid, start in procs:
        _signal(pid, start, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while True:
        for pid, _ in procs:
            _reap(pid)
        left = [p for p in procs if is_alive(*p)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for pid, start in left:
        _signal(pid, start, signal.SIGKILL)
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


def grpc_health(target: str, timeout_s: float = 1.0) -> str:
    """The grpc.health.v1 status of the server's overall service "", or why there is none."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code()
            return "UNREACHABLE" if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                else code.name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def redis_health(port: int, timeout_s: float = 1.0, pid: int | None = None) -> str:
    """SERVING when PING answers (from process `pid`, if given: not a server that took the port first),
    NOT_SERVING while it loads its data, else UNREACHABLE."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                         retry=Retry(NoBackoff(), 0))          # one probe, no hidden backoff
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


def health_of(kind: str, port: int, timeout_s: float = 1.0, pid: int | None = None) -> str:
    return redis_health(port, timeout_s, pid) if kind == "redis" else grpc_health(f"{LOOPBACK}:{port}", timeout_s)


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


def _find_redis_server() -> str | None:
    try:
        from services.common.redis_server import find_redis_server
    except ImportError:
        return shutil.which("redis-server")
    try:
        found = find_redis_server()
    except (FileNotFoundError, RuntimeError):
        return None
    return str(found) if found else None


# ---------------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------------

class _Launcher:
    """Starts a plan stage by stage, recording every launch in the state file as it goes."""

    def __init__(self, config: StackConfig, layout: Layout, say: Callable[[str], None],
                 stop_requested: threading.Event, supervised: bool) -> None:
        self.config, self.layout, self.say, self.stop_requested = config, layout, say, stop_requested
        self.logs = config.stack_dir / "logs"
        names = [n for stage in stage_names(config) for n in stage]
        free = iter(pick_free_ports(2 * len(names)))
        self.ports = {n: (next(free), next(free)) for n in names}
        self.popens: dict[str, subprocess.Popen] = {}
        self.records: list[ProcessRecord] = []
        self.log_starts: dict[str, int] = {}       # where this launch's output begins in its log
        me = os.getpid()
        self.state = StackState(
            name=config.name, mode=config.mode.value, stack_id=layout.stack_id, key_prefix=layout.key_prefix,
            segment_prefix=layout.segment_prefix, redis_url=redis_url_of(config, self.ports),
            owns_redis=config.redis_url is None,
            arena_socket=str(layout.arena_socket) if config.mode is Mode.SPLIT else None,
            gateway_target=None, supervisor_pid=me if supervised else None,
            supervisor_start_time=process_start_time(me) if supervised else None, created_at=time.time(),
            device=config.device)

    def start(self) -> StackState:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.config.redis_url is None:
            (self.config.stack_dir / "redis").mkdir(parents=True, exist_ok=True)
        self._save()                                 # before the first launch: `down` can always clean up
        if self.config.uses_mps:
            self._start_mps()
        deadline = time.monotonic() + self.config.startup_timeout_s
        for stage, names in enumerate(stage_names(self.config)):
            for name in names:
                self._launch(name, stage)
            self.say(f"starting {', '.join(names)}")
            started = time.monotonic()
            self._wait_serving(names, stage, deadline)
            self.say(f"{', '.join(names)} SERVING after {time.monotonic() - started:.1f} s")
            if self.layout.mps and "decode" in names:
                self._check_mps_clients(("prefill", "decode"))
        return self.state

    def _start_mps(self) -> None:
        """Use the operator's running MPS daemon, else start one on private directories; recorded at once."""
        candidates = [p for p in (self.config.mps_pipe_dir, mps.DEFAULT_PIPE_DIR) if p is not None]
        try:
            daemon = mps.ensure_daemon(candidates, self.layout.private_mps_pipe_dir(), self.logs / "mps")
        except (mps.MpsError, OSError) as e:
            raise StackError(f"cannot use NVIDIA MPS: {e}") from e
        self.layout = replace(self.layout, mps=daemon)
        self.state = replace(self.state, mps=asdict(daemon))
        self._save()
        self.say(f"MPS control daemon {daemon.pid} on {daemon.pipe_dir} "
                 f"({'started' if daemon.started_by_us else 'already running: used, not stopped at down'})")

    def _check_mps_clients(self, names: tuple[str, ...], timeout_s: float = 30.0) -> None:
        pids = {r.pid: r.name for r in self.records if r.name in names}
        try:
            mps.wait_for_clients(self.layout.mps, pids, timeout_s=timeout_s)
        except mps.MpsError as e:
            raise StackError(f"{' and '.join(names)} did not attach to MPS: {e}") from e
        self.say(f"{', '.join(f'{n} (pid {p})' for p, n in pids.items())} are MPS clients")

    def _spec(self, name: str) -> ProcessSpec:
        return process_spec(name, self.config, self.layout, self.ports)

    def _launch(self, name: str, stage: int) -> None:
        spec = self._spec(name)
        log_path = self.logs / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(spec.env)}
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(spec.argv)}\n".encode())
            log.flush()
            self.log_starts[name] = log.tell()
            try:
                popen = subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, close_fds=True)
            except OSError as e:
                raise StackError(f"cannot start {name} ({spec.argv[0]}): {e}") from e
        self.popens[name] = popen
        record = ProcessRecord(name=name, pid=popen.pid, start_time=process_start_time(popen.pid), stage=stage,
                               port=spec.port, metrics_port=spec.metrics_port, health=spec.health,
                               log=str(log_path), argv=spec.argv)
        self.records = [r for r in self.records if r.name != name] + [record]
        if name == "gateway":
            self.state = replace(self.state, gateway_target=spec.target)
        self._save()

    def _save(self) -> None:
        self.state = replace(self.state, processes=tuple(self.records),
                             redis_url=redis_url_of(self.config, self.ports))
        write_state(self.config.state_path, self.state)

    def _wait_serving(self, names: tuple[str, ...], stage: int, deadline: float) -> None:
        waiting = set(names)
        retries = {n: 0 for n in names}
        last: dict[str, str] = {}
        while waiting:
            if self.stop_requested.is_set():
                raise StackError("start interrupted")
            for name in sorted(waiting):
                popen = self.popens[name]
                record = next(r for r in self.records if r.name == name)
                if popen.poll() is not None:
                    tail = log_tail(record.log, since=self.log_starts[name])
                    if any(s in tail.lower() for s in BIND_FAILURES) and retries[name] < PORT_RETRIES:
                        retries[name] += 1
                        self.ports[name] = tuple(pick_free_ports(2, avoid=self._used_ports()))
                        self.say(f"{name}: port taken, retrying on {self.ports[name][0]}")
                        self._launch(name, stage)
                        continue
                    raise StackError(f"{name} exited with status {popen.returncode} while starting; "
                                     f"last lines of {record.log}:\n{tail}")
                last[name] = health_of(record.health, record.port, timeout_s=1.0, pid=record.pid)
                if last[name] == HEALTHY:
                    waiting.discard(name)
            if waiting and time.monotonic() >= deadline:
                name = sorted(waiting)[0]
                record = next(r for r in self.records if r.name == name)
                raise StackError(
                    f"{name} not SERVING after {self.config.startup_timeout_s:g} s (health: {last.get(name)}); "
                    f"last lines of {record.log}:\n{log_tail(record.log, since=self.log_starts[name])}")
            if waiting:
                self.stop_requested.wait(0.25)

    def _used_ports(self) -> set[int]:
        return {p for pair in self.ports.values() for p in pair}


def _check_redis_reachable(url: str) -> None:
    import redis
    try:
        client = redis.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=3.0)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as e:
        raise StackError(f"cannot reach the Redis at {url}: {e}") from e


def _check_not_running(config: StackConfig, say: Callable[[str], None]) -> None:
    state = read_state(config.state_path)
    if state is None:
        return
    state = follow_handovers(state)
    if is_alive(state.supervisor_pid, state.supervisor_start_time) or \
            any(is_alive(r.pid, r.start_time) for r in state.processes):
        raise StackError(
            f"a stack named {config.name!r} is already running (gateway {state.gateway_target or 'not started'}, "
            f"state {config.state_path}); stop it with `duoserve down"
            f"{'' if config.name == 'default' else ' --name ' + config.name}` or start another with --name")
    say(f"cleaning up what is left of a stopped stack {config.name!r}")
    teardown(state, config.state_path, config.stop_timeout_s, say)


def up(config: StackConfig, *, detach: bool, say: Callable[[str], None],
       out: TextIO | None = None) -> int:
    """Start the stack; detached: return once SERVING, else supervise it until stopped."""
    stop_requested = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    in_main_thread = threading.current_thread() is threading.main_thread()   # only it may take signals
    previous = {s: signal.signal(s, lambda *_: stop_requested.set()) for s in signals} if in_main_thread else {}
    try:
        if config.redis_url is None and config.redis_server is None:
            found = _find_redis_server()
            if found is None:
                raise StackError("redis-server not found: install it (apt-get install redis-server, or "
                                 "`make install`) or give an external Redis with --redis-url / REDIS_URL")
            config = replace(config, redis_server=found)
        if config.redis_url is not None:
            _check_redis_reachable(config.redis_url)
        with stack_lock(config.stack_dir):
            _check_not_running(config, say)
            launcher = _Launcher(config, Layout.new(config.stack_dir), say, stop_requested, supervised=not detach)
            started = time.monotonic()
            try:
                state = launcher.start()
            except BaseException:
                state = read_state(config.state_path)
                if state is not None:
                    say("start failed: stopping what was started")
                    teardown(state, config.state_path, config.stop_timeout_s, say)
                raise
        say(f"stack {config.name!r} ({config.mode.value}) SERVING after {time.monotonic() - started:.1f} s; "
            f"logs in {config.stack_dir / 'logs'}")
        print(state.gateway_target, file=out or sys.stdout, flush=True)
        if detach:
            return 0
        say("Ctrl-C stops it")
        return _supervise(config, state, launcher.popens, stop_requested, say)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _adopt_successors(config: StackConfig, state: StackState, popens: dict[str, subprocess.Popen],
                      adopted: dict[str, ProcessRecord], dead: list[tuple[str, int | None]]
                      ) -> tuple[StackState, list[tuple[str, int | None]]]:
    """A worker gone after a retune by handover lives on as its successor: watch (and record) that one."""
    followed = follow_handovers(state)
    still_dead = []
    for name, code in dead:
        live = [r for r in followed.processes if r.name == name and is_alive(r.pid, r.start_time)]
        if live:
            popens.pop(name, None)
            adopted[name] = live[-1]
        else:
            still_dead.append((name, code))
    if len(still_dead) < len(dead):
        write_state(config.state_path, followed)      # `down` and `status` find the successor without Redis
        return followed, still_dead
    return state, dead


def _supervise(config: StackConfig, state: StackState, popens: dict[str, subprocess.Popen],
               stop_requested: threading.Event, say: Callable[[str], None]) -> int:
    """Foreground: watch until a signal, a process exiting, or `duoserve down` (which signals us)."""
    status = 0
    adopted: dict[str, ProcessRecord] = {}      # workers that replaced themselves (retune by handover)
    while not stop_requested.wait(0.5):
        dead = [(name, p.returncode) for name, p in popens.items() if p.poll() is not None]
        dead += [(name, None) for name, r in adopted.items() if not is_alive(r.pid, r.start_time)]
        if dead:
            state, dead = _adopt_successors(config, state, popens, adopted, dead)
        if dead:
            for name, code in dead:
                record = next(r for r in state.processes if r.name == name)
                say(f"{name} exited with status {code}; last lines of {record.log}:\n{log_tail(record.log)}")
            status = 1
            break
        if not config.state_path.exists():
            say("state file removed: stopping")
            break
    with stack_lock(config.stack_dir):
        teardown(state, config.state_path, config.stop_timeout_s, say)
    return status


# ---------------------------------------------------------------------------------------------
# down, status
# ---------------------------------------------------------------------------------------------

def teardown(state: StackState, state_path: Path, stop_timeout_s: float,
             say: Callable[[str], None]) -> None:
    """Stop every process of `state` (reverse stage order) and remove what the stack left behind."""
    state = follow_handovers(state)
    for stage in sorted({r.stage for r in state.processes}, reverse=True):
        group = [r for r in state.processes if r.stage == stage]
        killed = stop_processes([(r.pid, r.start_time) for r in group], stop_timeout_s)
        for r in group:
            if r.pid in killed:
                say(f"{r.name} (pid {r.pid}) did not stop within {stop_timeout_s:g} s: killed")
    if not state.owns_redis:
        _delete_keys(state.redis_url, state.key_prefix, say)
    if state.segment_prefix:
        remove_segments(state.segment_prefix)
    if state.mps:                                      # before the socket's directory, which may hold its pipes
        _quit_mps(mps.MpsDaemon(**state.mps), say)
    if state.arena_socket:
        sock = Path(state.arena_socket)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        if sock.parent.name == state.stack_id:        # the /tmp fallback's own directory
            with contextlib.suppress(OSError):
                sock.parent.rmdir()
    if state.owns_redis:
        shutil.rmtree(state_path.parent / "redis", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()


def _quit_mps(daemon: mps.MpsDaemon, say: Callable[[str], None]) -> None:
    """Quit the MPS daemon the stack started (its clients have stopped); one it found keeps running."""
    if not daemon.started_by_us:
        return
    try:
        if not mps.quit_daemon(daemon):
            say(f"the MPS control daemon {daemon.pid} did not exit after `quit`")
            return
    except mps.MpsError as e:
        say(f"could not quit the MPS control daemon {daemon.pid}: {e}")
        return
    shutil.rmtree(daemon.pipe_dir, ignore_errors=True)
    say(f"MPS control daemon {daemon.pid} quit")


def _delete_keys(redis_url: str, key_prefix: str, say: Callable[[str], None]) -> None:
    """An external Redis keeps running; only this stack's keys go."""
    try:
        import redis
        client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        keys = list(client.scan_iter(match=f"{key_prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i:i + 500])
        client.close()
    except Exception as e:     # noqa: BLE001: best effort, the stack is already stopped
        say(f"could not delete keys {key_prefix}:* from {redis_url}: {e}")


def down(state_dir: Path, name: str, *, stop_timeout_s: float, say: Callable[[str], None]) -> int:
    """Stop a stack; cleans up even when some (or all) of its processes already died."""
    stack_dir = state_dir / name
    state_path = stack_dir / STATE_FILE
    state = read_state(state_path)
    if state is None:
        say(f"no stack named {name!r} (no {state_path})")
        return 1
    if is_alive(state.supervisor_pid, state.supervisor_start_time):    # a foreground `up`: it tears down
        _signal(state.supervisor_pid, state.supervisor_start_time, signal.SIGTERM, group=False)
        deadline = time.monotonic() + stop_timeout_s * (len(state.processes) + 1) + 10
        while is_alive(state.supervisor_pid, state.supervisor_start_time) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(state.supervisor_pid, state.supervisor_start_time):
            say(f"the foreground `duoserve up` (pid {state.supervisor_pid}) did not finish stopping: killed")
            _signal(state.supervisor_pid, state.supervisor_start_time, signal.SIGKILL, group=False)
    with stack_lock(stack_dir):
        state = read_state(state_path)
        if state is not None:                                            # detached, or the supervisor failed
            teardown(state, state_path, stop_timeout_s, say)
    say(f"stack {name!r} stopped")
    return 0


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    name: str
    pid: int
    alive: bool
    port: int
    metrics_port: int
    health: str                    # SERVING, NOT_SERVING, UNREACHABLE, ... or DEAD
    log: str


def stack_status(state: StackState) -> list[ProcessStatus]:
    out = []
    for r in state.processes:
        alive = is_alive(r.pid, r.start_time)
        health = health_of(r.health, r.port, timeout_s=1.0, pid=r.pid) if alive else "DEAD"
        out.append(ProcessStatus(r.name, r.pid, alive, r.port, r.metrics_port, health, r.log))
    return out


def status(state_dir: Path, name: str, *, as_json: bool, out: TextIO | None = None) -> int:
    """Print each process: name, pid, alive, port, health. 0 when every one is SERVING."""
    out = out or sys.stdout
    state = read_state(state_dir / name / STATE_FILE)
    if state is None:
        if as_json:
            print(json.dumps({"name": name, "running": False, "processes": []}), file=out)
        else:
            print(f"no stack named {name!r}", file=out)
        return 1
    procs = stack_status(follow_handovers(state))
    ok = bool(procs) and all(p.health == HEALTHY for p in procs)
    if as_json:
        print(json.dumps({
            "name": state.name, "running": ok, "mode": state.mode, "stack_id": state.stack_id,
            "gateway_target": state.gateway_target, "redis_url": state.redis_url, "owns_redis": state.owns_redis,
            "key_prefix": state.key_prefix, "segment_prefix": state.segment_prefix,
            "supervisor_pid": state.supervisor_pid, "device": state.device, "mps": state.mps,
            "processes": [asdict(p) for p in procs]}, indent=2), file=out)
        return 0 if ok else 1
    redis = f"{state.redis_url} ({'started by the stack' if state.owns_redis else 'external'})"
    mode = state.mode if state.device == "cpu" else f"{state.mode} on {state.device}"
    print(f"stack {state.name} ({mode}, id {state.stack_id})  gateway {state.gateway_target}  "
          f"redis {redis}", file=out)
    print(f"{'NAME':<10} {'PID':>8}  {'ALIVE':<5}  {'PORT':>5}  HEALTH", file=out)
    for p in procs:
        print(f"{p.name:<10} {p.pid:>8}  {'yes' if p.alive else 'no':<5}  {p.port:>5}  {p.health}", file=out)
    return 0 if ok else 1
