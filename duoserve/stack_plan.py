"""The plan of a stack (pure: no processes, no sockets): its config, the names and ports it invents,
and the command line and environment of every process, stage by stage. `duoserve.stack` runs it."""
from __future__ import annotations

import enum
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from duoserve.credentials import ADMIN_TOKEN_ENV, API_KEY_ENV, SECRET_ENV, with_password
from duoserve.pairs import (PAIR_ROLES, divide_cores, name_in_pair, pair_key_prefix, pair_key_prefixes, pair_of,
                            pair_socket, pair_stack_id, role_of, sibling)
from services.common import mps

LOOPBACK = "127.0.0.1"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SHM_DIR = Path("/dev/shm")
STATE_FILE = "state.json"
STATE_VERSION = 1
PORT_RETRIES = 3                   # relaunches of one process after a port collision
UNIX_SOCKET_PATH_MAX = 100         # sun_path is 108 bytes on Linux; leave room
BIND_FAILURES = ("address already in use", "cannot listen on", "failed to bind", "errno 98",
                 "could not create server tcp listening socket")
HEALTHY = "SERVING"
REDIS_AUTH_CONF = "auth.conf"      # in <stack dir>/redis: the stack's Redis password (mode 0600), not in argv
SUCCESSION_NAMES = ("prefill", "decode")   # workers that may be replaced by a successor (retune by succession)


def restart_with(name: str, device: str, memory_kept: bool) -> tuple[str, ...]:
    """What must restart after `name` restarted. The workers use the arena's memory: on the CPU a
    restarted arena re-opens its segments (`memory_kept`, services/arena/segments.py) and they go on
    with their requests; on CUDA its IPC allocations died with it, and a CPU arena that could not
    re-open made new segments: the workers are killed (SIGKILL: their requests stay pending in Redis),
    restart, attach the new memory and take their requests up, decode sending back to prefill every
    hand-off whose KV was in the old memory (Handoff.kv_memory)."""
    if role_of(name) == "arena" and (device == "cuda" or not memory_kept):
        return (sibling(name, "prefill"), sibling(name, "decode"))      # its own pair's workers
    return ()


def lost_with(name: str, device: str) -> tuple[str, ...]:
    """What is killed the moment `name` dies, before it restarts: on CUDA the workers with the arena,
    whose IPC allocations they compute on are gone with it (what they would compute now is not to be
    trusted); on the CPU a dead arena's segments stay mapped, and they go on until it is back."""
    if role_of(name) == "arena" and device == "cuda":
        return (sibling(name, "prefill"), sibling(name, "decode"))
    return ()


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
    weights: str = "packed"                  # cpu split: each worker's linear weights, "packed" (a private
                                             # oneDNN copy: faster GEMMs) or "shared" (the arena's, zero copy)
    num_kv_blocks: int | None = None         # KV pool size (None: the arena's / worker's memory budget)
    prefix_caching: bool = True              # the workers reuse cached prompt prefixes' KV blocks
    cpus: tuple[int, ...] = ()               # the stack's cores (empty: all this process may use)
    prefill_cpus: tuple[int, ...] = ()       # split: prefill's initial cores (empty: first half of `cpus`)
    decode_cpus: tuple[int, ...] = ()        # split: decode's initial cores (empty: second half of `cpus`)
    pairs: int = 1                           # split: arena + prefill + decode + orchestrator sets behind the
                                             # gateway (duoserve/pairs.py); on the CPU they divide the cores
    max_num_seqs: int | None = None          # worker limits; None keeps the worker's default
    max_num_batched_tokens: int | None = None
    chunk_size: int | None = None            # colocated: prompt tokens per hybrid iteration
    max_queue_len: int | None = None         # gateway: waiting requests before RESOURCE_EXHAUSTED
    startup_timeout_s: float = 600.0         # from the first launch to every process SERVING
    stop_timeout_s: float = 10.0             # SIGTERM -> SIGKILL, per stage
    restart: str = "always"                  # "always": a supervisor restarts a process that dies (backoff);
                                             # "never": the first death stops the stack (detached: nothing watches)
    with_orchestrator: bool = True           # split: run the orchestrator (SLO-aware shares, Admin API)
    admin_token: str = field(default="", repr=False)   # an Admin API bearer token besides the stack's secret
    auth: bool = True                        # a per-stack secret guards the workers' control service, the Admin
                                             # API and the stack's Redis (False: --no-auth, all open to local users)
    api_key: str = field(default="", repr=False)   # the gateway's public APIs want it (vLLM's --api-key); "": open
    tls_cert: Path | None = None             # the gateway's two APIs and the Admin API over TLS
    tls_key: Path | None = None
    python: str = sys.executable             # interpreter of the service processes
    redis_server: str | None = None          # redis-server binary (None: looked up on PATH)
    device: str = "cpu"                      # "cpu" or "cuda" (cuda:0; split mode runs under MPS)
    prefill_percentage: int = 50             # cuda split: prefill's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (a cap)
    decode_percentage: int = 50              # cuda split: decode's
    mps_pipe_dir: Path | None = None         # cuda: a running MPS daemon's pipe dir to use (else the default
                                             # /tmp/nvidia-mps, else a private daemon is started)
    cuda_retune_mode: str = "succession"     # cuda split: "succession" (a standby at the new MPS percentage) or
                                             # "green" (green-context partitions in each worker, MPS at 100 %)
    host: str = LOOPBACK                     # the gateway's bind address (both APIs); the rest stay on loopback
    port: int = 0                            # the gateway's gRPC port; 0: any free port (`duoserve up`: 50051)
    http_port: int = 0                       # its OpenAI-compatible HTTP port; 0: any free port (`up`: 8000)

    @property
    def connect_host(self) -> str:
        """Where clients on this machine reach the gateway."""
        return LOOPBACK if self.host in WILDCARD_HOSTS else self.host

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
        if self.restart not in ("always", "never"):
            raise ValueError(f"restart must be always or never, got {self.restart!r}")
        if self.startup_timeout_s <= 0 or self.stop_timeout_s < 0:
            raise ValueError("startup timeout must be positive and stop timeout not negative")
        if self.host not in (LOOPBACK, "localhost", *WILDCARD_HOSTS):
            raise ValueError(f"--host {self.host!r}: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)")
        for flag, port in (("--port", self.port), ("--http-port", self.http_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{flag} {port}: a TCP port is 0 (any free port) to 65535")
        if self.port and self.port == self.http_port:
            raise ValueError(f"--port and --http-port are both {self.port}; give the two APIs different ports")
        if self.weights not in ("packed", "shared"):
            raise ValueError(f"weights must be packed or shared, got {self.weights!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        mps.check_percentage(self.prefill_percentage)
        self._check_pairs()
        if self.cuda_retune_mode not in ("succession", "green"):
            raise ValueError(f"retune mode must be succession or green, got {self.cuda_retune_mode!r}")
        mps.check_percentage(self.decode_percentage)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")

    @property
    def tls_args(self) -> tuple[str, ...]:
        """The gateway's and the orchestrator's TLS flags (paths: no secret in them)."""
        if self.tls_cert is None:
            return ()
        return ("--tls-cert", str(Path(self.tls_cert).resolve()), "--tls-key", str(Path(self.tls_key).resolve()))

    def _check_pairs(self) -> None:
        if self.pairs == 1:
            return
        if self.mode is not Mode.SPLIT:
            raise ValueError("--pairs is for the split mode: the colocated baseline runs one engine")
        if self.device != "cpu":
            raise ValueError("--pairs above 1 runs on the CPU only for now: on GPUs run one stack per device "
                             "(CUDA_VISIBLE_DEVICES) or the Kubernetes manifests in deploy/ (a pair per GPU)")
        if self.prefill_cpus or self.decode_cpus:
            raise ValueError("--prefill-cpus/--decode-cpus set one pair's cores; with --pairs the cores "
                             "are divided between the pairs (give --cpus)")
        divide_cores(self.stack_cores(), self.pairs)          # ValueError: fewer cores than pairs

    @property
    def pair_names(self) -> tuple[tuple[str, ...], ...]:
        """Each pair's process names, by role order (duoserve/pairs.py)."""
        return tuple(tuple(name_in_pair(role, i, self.pairs) for role in PAIR_ROLES) for i in range(self.pairs))

    def stack_cores(self) -> tuple[int, ...]:
        return self.cpus or tuple(sorted(os.sched_getaffinity(0)))

    def pair_cores(self, pair: int) -> tuple[int, ...]:
        """Pair `pair`'s cores: its slice of the stack's."""
        return divide_cores(self.stack_cores(), self.pairs)[pair]

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

    def worker_cpus(self, pair: int = 0) -> dict[str, tuple[int, ...]]:
        """Each worker's initial cores by role: split halves the pair's cores (2 cores: prefill 0,
        decode 1; one core: both on it)."""
        if self.mode is Mode.COLOCATED:
            return {"colocated": self.stack_cores()}
        pool = self.pair_cores(pair)
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
    secret: str = field(default="", repr=False)   # the stack's secret (duoserve.credentials); "": --no-auth

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
    health: str = "grpc"           # "grpc": grpc.health.v1 Check; "grpc-tls": the same over TLS; "redis": PING
    env: tuple[tuple[str, str], ...] = ()   # extra environment (secrets stay off the command line)
    http_port: int = 0             # gateway: the OpenAI-compatible HTTP API (0: none)
    host: str = LOOPBACK           # where its health check (and this machine's clients) reach it

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


# ---------------------------------------------------------------------------------------------
# The plan (pure: no processes, no sockets)
# ---------------------------------------------------------------------------------------------

def stage_names(config: StackConfig) -> tuple[tuple[str, ...], ...]:
    """Start order; processes within a stage start together."""
    redis = () if config.redis_url else (("redis",),)
    if config.mode is Mode.COLOCATED:
        return redis + (("colocated",), ("gateway",))
    pairs = config.pair_names
    orchestrators = tuple(p[3] for p in pairs) if config.with_orchestrator else ()
    return redis + (tuple(p[0] for p in pairs), tuple(n for p in pairs for n in p[1:3]), ("gateway", *orchestrators))


def ports_needed(name: str) -> int:
    """Ports a process listens on: gRPC and metrics; the gateway also the OpenAI-compatible HTTP API.
    `ports[name]` in `plan` holds them in that order."""
    return 3 if name == "gateway" else 2


def redis_url_of(config: StackConfig, ports: dict[str, tuple[int, ...]], secret: str = "") -> str:
    """The URL every process connects with; the stack's own Redis wants the secret as its password."""
    if config.redis_url:
        return config.redis_url
    url = f"redis://{LOOPBACK}:{ports['redis'][0]}/0"
    return with_password(url, secret) if secret else url


def redis_auth_conf(config: StackConfig) -> Path:
    """The config file with the stack's Redis password (`requirepass`): written by `up` before Redis starts."""
    return config.stack_dir / "redis" / REDIS_AUTH_CONF


def plan(config: StackConfig, layout: Layout,
         ports: dict[str, tuple[int, ...]]) -> list[list[ProcessSpec]]:
    """Every process of the stack, in stages. `ports[name]` is (port, metrics port[, HTTP port])."""
    return [[process_spec(name, config, layout, ports) for name in stage] for stage in stage_names(config)]


def process_spec(name: str, config: StackConfig, layout: Layout,
                 ports: dict[str, tuple[int, ...]]) -> ProcessSpec:
    port, metrics_port = ports[name][:2]
    role, pair = role_of(name), pair_of(name)
    key_prefix = pair_key_prefix(layout.key_prefix, pair, config.pairs) if role in PAIR_ROLES else layout.key_prefix
    arena_socket = pair_socket(layout.arena_socket, pair, config.pairs)
    # Secrets go by environment only: /proc/<pid>/environ is its owner's alone, a command line is everyone's.
    # Always set, empty when off: an operator's shell that exports one must not reach the processes.
    secret = ((SECRET_ENV, layout.secret),)
    redis_env = (("REDIS_URL", redis_url_of(config, ports, layout.secret)),)
    common = ("--key-prefix", key_prefix, "--port", str(port), "--metrics-port", str(metrics_port))
    py = (config.python, "-m")
    model = ("--model", config.model) if config.model else ()
    kv = ("--num-kv-blocks", str(config.num_kv_blocks)) if config.num_kv_blocks else ()
    if role == "redis":
        # An append-only file (fsync'd every second, in the background): restarted by the supervisor,
        # Redis comes back with the queues, the block pool and every request's state.
        conf = (str(redis_auth_conf(config)),) if layout.secret else ()      # must come first
        argv = (config.redis_server or "redis-server", *conf, "--bind", LOOPBACK, "--port", str(port),
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
                "--protected-mode", "yes", "--dir", str(config.stack_dir / "redis"))
        return ProcessSpec(name, argv, port, 0, health="redis")
    device = ("--device", config.device) if config.device != "cpu" else ()
    if role == "arena":
        argv = py + ("services.arena.main", *common, *model, "--cache-dir", str(config.cache_dir),
                     "--dtype", config.dtype, *kv, "--stack-id", pair_stack_id(layout.stack_id, pair, config.pairs),
                     "--socket", str(arena_socket), *device)
        # An MPS client too (no compute, no limit): its allocations are the ones the workers open.
        env = redis_env + (tuple(layout.mps.client_env().items()) if layout.mps else ())
        return ProcessSpec(name, argv, port, metrics_port, env=env)
    if role in ("prefill", "decode", "colocated"):
        limits: list[str] = []
        for flag, value in (("--max-num-seqs", config.max_num_seqs),
                            ("--max-num-batched-tokens", config.max_num_batched_tokens),
                            ("--chunk-size", config.chunk_size)):
            if value is not None:
                limits += [flag, str(value)]
        cpus = ",".join(map(str, config.worker_cpus(pair)[role]))
        where = (("--arena-socket", str(arena_socket), "--weights", config.weights) if role != "colocated"
                 else (*model, "--dtype", config.dtype, *kv))
        caching = () if config.prefix_caching else ("--no-prefix-caching",)
        green = config.uses_mps and config.cuda_retune_mode == "green" and name != "colocated"
        retune = ("--retune-mode", "green") if green else ()
        pair_cpus = ("--stack-cpus", ",".join(map(str, config.pair_cores(pair)))) if config.pairs > 1 else ()
        argv = py + (f"services.{role}.main", *common, *where, "--cache-dir", str(config.cache_dir),
                     "--cpus", cpus, *pair_cpus, *limits, *caching, *retune, *device)
        # Idle OpenMP threads sleep instead of spinning: two workers share cores (and a busy machine's
        # cores), and a spinning thread that loses its core stalls its siblings.
        env = redis_env + secret + (("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE")),)
        if layout.mps and name != "colocated":      # its SM cap, fixed when its CUDA context is created
            percentage = config.prefill_percentage if role == "prefill" else config.decode_percentage
            percentage = 100 if green else percentage      # green partitions are the cap, not MPS
            env += tuple(layout.mps.client_env(percentage).items())
        return ProcessSpec(name, argv, port, metrics_port, env=env)
    if role == "gateway":
        queue = ("--max-queue-len", str(config.max_queue_len)) if config.max_queue_len else ()
        http_port = ports[name][2] if len(ports[name]) > 2 else 0
        # Its HTTP /metrics serves every other process's series too: one scrape target for the stack.
        peers = tuple(arg for other in (n for stage in stage_names(config) for n in stage)
                      if other not in ("redis", "gateway") and ports[other][1]
                      for arg in ("--peer-metrics", f"{other}={LOOPBACK}:{ports[other][1]}"))
        pair_prefixes = ("--pair-prefixes", ",".join(pair_key_prefixes(layout.key_prefix, config.pairs))) \
            if config.pairs > 1 else ()
        argv = py + ("services.gateway.main", *common, *queue, "--host", config.host, "--http-host", config.host,
                     "--http-port", str(http_port), *pair_prefixes, *peers, *config.tls_args)
        env = redis_env + ((API_KEY_ENV, config.api_key),)
        return ProcessSpec(name, argv, port, metrics_port, http_port=http_port, host=config.connect_host, env=env,
                           health="grpc-tls" if config.tls_cert else "grpc")
    if role == "orchestrator":
        cpus = ",".join(map(str, config.pair_cores(pair)))        # the cores its pair's shares are cut from
        env = redis_env + secret + ((ADMIN_TOKEN_ENV, config.admin_token),)
        # Its shares are SMs (TPC steps, the GPU prior) on cuda, cores on the cpu: it must know which.
        return ProcessSpec(name, py + ("orchestrator.main", *common, "--cpus", cpus, *device, *config.tls_args), port,
                           metrics_port, env=env, health="grpc-tls" if config.tls_cert else "grpc")
    raise ValueError(f"unknown process {name!r}")
