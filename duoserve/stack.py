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
  running    a supervisor (duoserve/supervisor.py) watches the processes and restarts one that dies
             (`--restart never`: the first death stops the stack): the foreground `up` itself until
             Ctrl-C / SIGTERM / SIGHUP or `duoserve down`; detached, a process of its own recorded in the
             state file, which `down` stops first
  stopped    stages in reverse order: SIGTERM, wait, SIGKILL; the Redis it started stopped (an external
             one only loses this stack's keys); /dev/shm/duoserve-<stack id>-* segments, the arena socket
             and the state file removed. The logs stay.

--device cuda (split): before the arena, an MPS control daemon already serving the operator's pipe
directory is used, else one is started on private directories (<stack dir>/mps, logs/mps); the arena
and both workers are its clients (the workers each with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), which is
checked once they are SERVING. `down` quits the daemon only if this stack started it.

One directory per stack name (mode 0700): <state dir>/<name>/{state.json, secret, logs/, redis/, arena.sock,
lock}. The secret (duoserve/credentials.py; not with `--no-auth`) guards the workers' control service, the
Admin API and the stack's Redis; it reaches the processes by environment only, never their command lines.
A pid in the state file is trusted only together with its start time (from /proc), so a recycled pid
is never signalled. No torch here: `duoserve status` and `down` are instant.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, TextIO

from duoserve.stack_plan import (LOOPBACK, SHM_DIR, STATE_FILE, STATE_VERSION, PORT_RETRIES,
    UNIX_SOCKET_PATH_MAX, BIND_FAILURES, HEALTHY, SUCCESSION_NAMES, StackError, Mode, StackConfig, Layout,
    ProcessSpec, stage_names, ports_needed, redis_url_of, redis_auth_conf, plan, process_spec)
from duoserve.stack_procs import (bindable, ProcessRecord, StackState, write_state, read_state, make_stack_dir,
    stack_lock, process_start_time, is_alive, follow_successions, signal_process, stop_processes,
    pick_free_ports, port_in_use, grpc_health, redis_health, health_of, record_health, log_tail, remove_segments,
    find_redis_server, launch_process)
from duoserve import supervisor
from duoserve.credentials import SECRET_FILE, CredentialError, ensure_secret, redact_url
from services.common import mps

__all__ = [   # the supervisor's API, with the plan and process helpers it re-exports
    "LOOPBACK", "SHM_DIR", "STATE_FILE", "STATE_VERSION", "PORT_RETRIES", "UNIX_SOCKET_PATH_MAX",
    "BIND_FAILURES", "HEALTHY", "SUCCESSION_NAMES", "StackError", "Mode", "StackConfig", "Layout",
    "ProcessSpec", "stage_names", "ports_needed", "redis_url_of", "plan", "process_spec", "ProcessRecord", "StackState",
    "write_state", "read_state", "make_stack_dir", "stack_lock", "process_start_time", "is_alive",
    "follow_successions", "signal_process", "stop_processes", "pick_free_ports", "port_in_use", "grpc_health",
    "redis_health", "health_of", "log_tail", "remove_segments", "find_redis_server", "up", "teardown",
    "down", "ProcessStatus", "stack_status", "status",
]


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
        self.ports: dict[str, tuple[int, ...]] = {}
        for name in names:
            self.ports[name] = self._pick_ports(name)
        self.popens: dict[str, subprocess.Popen] = {}
        self.records: list[ProcessRecord] = []
        self.log_starts: dict[str, int] = {}       # where this launch's output begins in its log
        me = os.getpid()
        self.state = StackState(
            name=config.name, mode=config.mode.value, stack_id=layout.stack_id, key_prefix=layout.key_prefix,
            segment_prefix=layout.segment_prefix, redis_url=redis_url_of(config, self.ports, layout.secret),
            owns_redis=config.redis_url is None,
            arena_socket=str(layout.arena_socket) if config.mode is Mode.SPLIT else None,
            gateway_target=None, supervisor_pid=me if supervised else None,
            supervisor_start_time=process_start_time(me) if supervised else None, created_at=time.time(),
            device=config.device, secret_file=str(config.stack_dir / SECRET_FILE) if layout.secret else None,
            tls_cert=str(Path(config.tls_cert).resolve()) if config.tls_cert else None, pairs=config.pairs)

    def start(self) -> StackState:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.config.redis_url is None:
            (self.config.stack_dir / "redis").mkdir(parents=True, exist_ok=True)
            if self.layout.secret:
                _write_private(redis_auth_conf(self.config), f"requirepass {self.layout.secret}\n")
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
        self.log_starts[name] = log_path.stat().st_size if log_path.exists() else 0
        try:
            popen = launch_process(spec.argv, dict(spec.env), log_path)
        except OSError as e:
            raise StackError(f"cannot start {name} ({spec.argv[0]}): {e}") from e
        self.popens[name] = popen
        record = ProcessRecord(name=name, pid=popen.pid, start_time=process_start_time(popen.pid), stage=stage,
                               port=spec.port, metrics_port=spec.metrics_port, health=spec.health,
                               log=str(log_path), argv=spec.argv, http_port=spec.http_port, env=spec.env)
        self.records = [r for r in self.records if r.name != name] + [record]
        if name == "gateway":
            scheme = "https" if self.config.tls_cert else "http"
            self.state = replace(self.state, gateway_target=spec.target,
                                 http_url=f"{scheme}://{spec.host}:{spec.http_port}" if spec.http_port else None)
        self._save()

    def _save(self) -> None:
        self.state = replace(self.state, processes=tuple(self.records),
                             redis_url=redis_url_of(self.config, self.ports, self.layout.secret))
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
                    if any(s in tail.lower() for s in BIND_FAILURES) and name == "gateway":
                        _check_public_ports(self.config)      # taken meanwhile: say which flag
                    if any(s in tail.lower() for s in BIND_FAILURES) and retries[name] < PORT_RETRIES:
                        retries[name] += 1
                        self.ports[name] = self._pick_ports(name)
                        self.say(f"{name}: port taken, retrying on {self.ports[name][0]}")
                        self._launch(name, stage)
                        continue
                    raise StackError(f"{name} exited with status {popen.returncode} while starting; "
                                     f"last lines of {record.log}:\n{tail}")
                last[name] = record_health(record, self.state, timeout_s=1.0)
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

    def _pick_ports(self, name: str) -> tuple[int, ...]:
        """The one place ports are chosen: free loopback ports, none another process of the plan holds;
        the gateway's two public ports as configured (0: free ones too)."""
        free = iter(pick_free_ports(ports_needed(name), avoid=self._used_ports() | set(self._public_ports())))
        if name != "gateway":
            return tuple(next(free) for _ in range(ports_needed(name)))
        grpc_port, metrics_port, http_port = next(free), next(free), next(free)
        return self.config.port or grpc_port, metrics_port, self.config.http_port or http_port

    def _public_ports(self) -> tuple[int, ...]:
        return tuple(p for p in (self.config.port, self.config.http_port) if p)

    def _used_ports(self) -> set[int]:
        return {p for ports in self.ports.values() for p in ports}


def _write_private(path: Path, text: str) -> None:
    """A file only its owner may read, written before anyone can open it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)             # an older file of another mode keeps it otherwise
        f.write(text)


def _check_redis_reachable(url: str) -> None:
    import redis
    try:
        client = redis.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=3.0)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError) as e:
        raise StackError(f"cannot reach the Redis at {redact_url(url)}: {e}") from e


def _check_public_ports(config: StackConfig) -> None:
    """The gateway's configured ports must be free: one line naming the flag, not a traceback."""
    for flag, port in (("--port", config.port), ("--http-port", config.http_port)):
        if port and not bindable(config.host, port):
            raise StackError(f"{flag} {port}: {config.host}:{port} is already in use (another stack? "
                             f"`duoserve status --name NAME`); choose another with {flag} PORT, or {flag} 0 "
                             "for any free port")


def _check_not_running(config: StackConfig, say: Callable[[str], None]) -> None:
    state = read_state(config.state_path)
    if state is None:
        return
    state = follow_successions(state)
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
            found = find_redis_server()
            if found is None:
                raise StackError("redis-server not found: install it (apt-get install redis-server, or "
                                 "`make install`) or give an external Redis with --redis-url / REDIS_URL")
            config = replace(config, redis_server=found)
        with stack_lock(config.stack_dir):
            _check_not_running(config, say)
            _check_public_ports(config)
            if config.redis_url is not None:
                _check_redis_reachable(config.redis_url)
            layout = Layout.new(config.stack_dir)
            if config.auth:
                try:
                    layout = replace(layout, secret=ensure_secret(config.stack_dir))
                except CredentialError as e:
                    raise StackError(str(e)) from None
            launcher = _Launcher(config, layout, say, stop_requested, supervised=not detach)
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
        if state.http_url:          # stdout's one line stays the gRPC target, which scripts read
            say(f"gRPC on {state.gateway_target}; OpenAI-compatible HTTP API on {state.http_url}/v1")
        print(state.gateway_target, file=out or sys.stdout, flush=True)
        if detach:
            if config.restart == "always":
                with stack_lock(config.stack_dir):
                    _start_detached_supervisor(config, state, say)
            return 0
        say("Ctrl-C stops it")
        return _supervise(config, state, launcher.popens, stop_requested, say)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _start_detached_supervisor(config: StackConfig, state: StackState, say: Callable[[str], None]) -> StackState:
    """A detached stack is supervised too: by a process of its own, recorded as the state's supervisor."""
    log_path = config.stack_dir / "logs" / "supervisor.log"
    try:
        popen = launch_process(supervisor.command(config.stack_dir, config.stop_timeout_s, config.python), {},
                               log_path)
    except OSError as e:
        raise StackError(f"cannot start the stack's supervisor: {e}") from e
    state = replace(state, supervisor_pid=popen.pid, supervisor_start_time=process_start_time(popen.pid))
    write_state(config.state_path, state)
    say(f"supervisor (pid {popen.pid}) restarts any process that dies; its log: {log_path}")
    return state


def _supervise(config: StackConfig, state: StackState, popens: dict[str, subprocess.Popen],
               stop_requested: threading.Event, say: Callable[[str], None]) -> int:
    """Foreground: watch (and restart, unless --restart never) until a signal or `duoserve down`."""
    def stop_all(current: StackState) -> None:
        teardown(current, config.state_path, config.stop_timeout_s, say)

    return supervisor.Supervisor(config.state_path, restart=config.restart == "always", stop_requested=stop_requested,
                                 say=say, teardown=stop_all, popens=list(popens.values()),
                                 stop_timeout_s=config.stop_timeout_s).run(state)


# ---------------------------------------------------------------------------------------------
# down, status
# ---------------------------------------------------------------------------------------------

def teardown(state: StackState, state_path: Path, stop_timeout_s: float,
             say: Callable[[str], None]) -> None:
    """Stop every process of `state` (reverse stage order) and remove what the stack left behind."""
    state = follow_successions(state)
    for stage in sorted({r.stage for r in state.processes}, reverse=True):
        group = [r for r in state.processes if r.stage == stage]
        killed = stop_processes([(r.pid, r.start_time) for r in group], stop_timeout_s)
        for r in group:
            if r.pid in killed:
                say(f"{r.name} (pid {r.pid}) did not stop within {stop_timeout_s:g} s: killed")
    if not state.owns_redis:
        _delete_keys(state.redis_url, state.key_prefix, say)
    for pair in range(state.pairs):
        if state.segment_prefix:
            remove_segments(state.pair_segment_prefix(pair))
    if state.mps:                                      # before the socket's directory, which may hold its pipes
        _quit_mps(mps.MpsDaemon(**state.mps), say)
    for pair in range(state.pairs):
        if state.arena_socket:
            with contextlib.suppress(FileNotFoundError):
                Path(state.pair_arena_socket(pair)).unlink()
    if state.arena_socket and Path(state.arena_socket).parent.name == state.stack_id:   # the /tmp fallback's own
        with contextlib.suppress(OSError):
            Path(state.arena_socket).parent.rmdir()
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
        say(f"could not delete keys {key_prefix}:* from {redact_url(redis_url)}: {e}")


def down(state_dir: Path, name: str, *, stop_timeout_s: float, say: Callable[[str], None]) -> int:
    """Stop a stack; cleans up even when some (or all) of its processes already died."""
    stack_dir = state_dir / name
    state_path = stack_dir / STATE_FILE
    state = read_state(state_path)
    if state is None:
        say(f"no stack named {name!r} (no {state_path})")
        return 1
    if is_alive(state.supervisor_pid, state.supervisor_start_time):    # a foreground `up` or the detached
                                                                         # supervisor: it tears down
        signal_process(state.supervisor_pid, state.supervisor_start_time, signal.SIGTERM, group=False)
        deadline = time.monotonic() + stop_timeout_s * (len(state.processes) + 1) + 10
        while is_alive(state.supervisor_pid, state.supervisor_start_time) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(state.supervisor_pid, state.supervisor_start_time):
            say(f"the stack's supervisor (pid {state.supervisor_pid}) did not finish stopping: killed")
            signal_process(state.supervisor_pid, state.supervisor_start_time, signal.SIGKILL, group=False)
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
    restarts: int = 0              # times the supervisor restarted it


def stack_status(state: StackState) -> list[ProcessStatus]:
    out = []
    for r in state.processes:
        alive = is_alive(r.pid, r.start_time)
        health = record_health(r, state, timeout_s=1.0) if alive else "DEAD"
        out.append(ProcessStatus(r.name, r.pid, alive, r.port, r.metrics_port, health, r.log, r.restarts))
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
    procs = stack_status(follow_successions(state))
    ok = bool(procs) and all(p.health == HEALTHY for p in procs)
    if as_json:
        print(json.dumps({
            "name": state.name, "running": ok, "mode": state.mode, "stack_id": state.stack_id,
            "gateway_target": state.gateway_target, "http_url": state.http_url,
            "redis_url": redact_url(state.redis_url), "secret_file": state.secret_file, "tls_cert": state.tls_cert,
            "owns_redis": state.owns_redis,
            "key_prefix": state.key_prefix, "segment_prefix": state.segment_prefix,
            "supervisor_pid": state.supervisor_pid, "device": state.device, "mps": state.mps,
            "processes": [asdict(p) for p in procs]}, indent=2), file=out)
        return 0 if ok else 1
    redis = f"{redact_url(state.redis_url)} ({'started by the stack' if state.owns_redis else 'external'})"
    mode = state.mode if state.device == "cpu" else f"{state.mode} on {state.device}"
    http = f"  http {state.http_url}" if state.http_url else ""
    print(f"stack {state.name} ({mode}, id {state.stack_id})  gateway {state.gateway_target}{http}  "
          f"redis {redis}", file=out)
    print(f"auth: {f'the stack secret in {state.secret_file}' if state.secret_file else 'off (--no-auth)'}; "
          f"TLS: {state.tls_cert or 'off'}", file=out)
    supervised = is_alive(state.supervisor_pid, state.supervisor_start_time)
    print(f"supervisor: {f'pid {state.supervisor_pid}' if supervised else 'none (processes that die stay dead)'}",
          file=out)
    print(f"{'NAME':<12} {'PID':>8}  {'ALIVE':<5}  {'PORT':>5}  {'RESTARTS':>8}  HEALTH", file=out)
    for p in procs:
        print(f"{p.name:<12} {p.pid:>8}  {'yes' if p.alive else 'no':<5}  {p.port:>5}  {p.restarts:>8}  {p.health}",
              file=out)
    return 0 if ok else 1
