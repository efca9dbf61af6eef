"""A private `redis-server` process: the embedded default of a stack, and the fixture of the tests.

A server's life here:
  starting  a free loopback port is picked (bind to port 0), the binary is started with its own
            dir, logfile and pidfile, and we wait until PING answers from *our* process
            (INFO's process_id is checked, so a server that grabbed the port first is never mistaken
            for ours); a port taken in between is retried with a new one
  serving   `.url` is what clients connect to; nothing is persisted unless appendonly was asked for
  stopped   SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL, each after a grace period; always reaped

Nothing here reads the environment: the caller passes the directory, the port and the binary.
"""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("duoserve.redis_server")

LOOPBACK = "127.0.0.1"
LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
_COMMON_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server",
                 "/opt/homebrew/bin/redis-server")
_PORT_TRIES = 5                     # new ports tried when the picked one is taken before redis binds it


class RedisServerError(RuntimeError):
    """redis-server did not start (or not as ours); the message carries the tail of its log."""


def find_redis_server() -> Path:
    """The `redis-server` binary: on PATH, else in the usual install places."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for candidate in _COMMON_PATHS:
        path = Path(candidate)
        if path.is_file() and shutil.which(str(path)):
            return path
    raise FileNotFoundError(
        "redis-server not found on PATH or in /usr/bin, /usr/local/bin: install it with "
        "`apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS), "
        "or give an external Redis URL instead")


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel's pick for port 0). Another process may take
    it before we bind it: callers retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RedisServerProcess:
    """A running redis-server we started; `stop()` ends it (also on `with` exit)."""

    port: int
    dir: Path
    process: subprocess.Popen = field(repr=False)
    log_offset: int = field(default=0, repr=False)      # where this run's lines start in the log
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_NAME

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, num_lines: int = 20) -> str:
        return _tail(self.log_path, self.log_offset, num_lines)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SHUTDOWN NOSAVE, then terminate, then kill; waits for the process. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            client = _probe_client(self.port, timeout_s)
            try:
                # Only ours: while starting, the port may turn out to be another server's.
                if int(client.info("server")["process_id"]) == self.pid:
                    client.shutdown(nosave=True)
            except redis.RedisError:
                pass            # the expected answer is a dropped connection; or it is already gone
            finally:
                client.close()
        for signal_it in (lambda: None, self.process.terminate, self.process.kill):
            signal_it()
            try:
                self.process.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d still running; escalating", self.pid)
        self.process.wait()

    def __enter__(self) -> RedisServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis_server(dir: Path, port: int | None = None, *, appendonly: bool = False,
                       binary: Path | str | None = None, timeout_s: float = 10.0) -> RedisServerProcess:
    """Start redis-server on 127.0.0.1 with `dir` as its working dir (log, pidfile, AOF).

    port None: a free port is picked (and a new one tried if another process takes it first).
    appendonly: persist every write (`--appendonly yes --appendfsync everysec`); RDB snapshots stay
    off either way. Raises RedisServerError with the log tail if it does not answer in `timeout_s`.
    """
    exe = Path(binary) if binary is not None else find_redis_server()
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    tries = 1 if port is not None else _PORT_TRIES
    for attempt in range(1, tries + 1):
        chosen = port if port is not None else free_port()
        server = _spawn(exe, dir, chosen, appendonly)
        try:
            _wait_ready(server, timeout_s)
            return server
        except _PortTaken as e:
            server.stop(timeout_s=1.0)
            if attempt == tries:
                raise RedisServerError(str(e)) from None
            log.info("port %d was taken before redis-server bound it; trying another", chosen)
        except BaseException:
            server.stop(timeout_s=1.0)
            raise
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    pass


def _spawn(exe: Path, dir: Path, port: int, appendonly: bool) -> RedisServerProcess:
    argv = [str(exe),
            "--bind", LOOPBACK, "--port", str(port), "--protected-mode", "yes",
            "--dir", str(dir), "--logfile", str(dir / LOG_NAME), "--pidfile", str(dir / PID_NAME),
            "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if appendonly else "no"]
    if appendonly:
        argv += ["--appendfsync", "everysec"]
    with open(dir / LOG_NAME, "ab") as console:      # errors before the logfile opens go here too
        offset = console.seek(0, 2)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                                   cwd=dir)
    return RedisServerProcess(port=port, dir=dir, process=process, log_offset=offset)


def _wait_ready(server: RedisServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = _probe_client(server.port, 0.25)      # a timeout just means: ask again
    try:
        while True:
            if server.process.poll() is not None:
                tail = server.log_tail()
                message = (f"redis-server ({server.process.args[0]}) exited with code "
                           f"{server.process.returncode} while starting on port {server.port}; "
                           f"log {server.log_path}:\n{tail}")
                raise (_PortTaken if "in use" in tail.lower() else RedisServerError)(message)
            try:
                if client.ping():
                    pid = int(client.info("server")["process_id"])
                    if pid == server.pid:
                        return
                    raise _PortTaken(f"port {server.port} is served by another redis-server (pid {pid})")
            except (redis.ConnectionError, redis.TimeoutError):
                pass
            except redis.ResponseError as e:
                if "LOADING" not in str(e):      # an AOF being replayed answers LOADING: keep waiting
                    raise
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server pid {server.pid} did not answer PING on {LOOPBACK}:{server.port} "
                    f"within {timeout_s:.0f} s; log {server.log_path}:\n{server.log_tail()}")
            time.sleep(0.02)
    finally:
        client.close()


def _probe_client(port: int, timeout_s: float) -> redis.Redis:
    """One-shot client: no retries (redis-py's default backoff would add seconds to every probe)."""
    return redis.Redis(host=LOOPBACK, port=port, socket_timeout=timeout_s, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))


def _tail(path: Path, offset: int, num_lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(lines[-num_lines:]) or "(log empty)"
