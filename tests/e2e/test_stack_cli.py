"""`duoserve up / status / down` and `generate --target`.

The fast tests check what needs no process of ours: the plan, the config, the state file, free ports,
the CLI's imports. The slow ones start real stacks (a real redis-server, arena, workers, gateway and
orchestrator, the real model): up -> generate -> down from the command line in both modes; a start that
fails (a model that does not exist) or misses its deadline, and is torn down; a foreground `up` stopped
by Ctrl-C or `duoserve down`; and a second split stack, "beside", in the session split stack's Redis,
started while the port planned for its arena is taken. On "beside": the arena is relaunched on a new
port, both stacks answer side by side, a recycled pid is never signalled, and `down` kills a worker
that cannot take SIGTERM (SIGSTOPped), cleans up after an arena that was SIGKILLed, and leaves the
other stack, its Redis and its keys as they were.

Every real stack is checked to leave nothing behind: no process (redis-server by its pid, the others
also by their key prefix in /proc/*/cmdline), no port, no shared-memory segment, no socket, no state file.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pytest

import duoserve
from duoserve import stack
from duoserve.stack import Layout, Mode, StackConfig, StackError

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def make_config(tmp_path: Path, **overrides) -> StackConfig:
    return StackConfig(**{"state_dir": tmp_path / "state", "cache_dir": tmp_path / "models",
                          "startup_timeout_s": 30.0, "stop_timeout_s": 3.0, **overrides})


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def test_split_plan_starts_redis_arena_workers_then_gateway_and_orchestrator(tmp_path):
    config = make_config(tmp_path, cpus=(0, 1), num_kv_blocks=64, admin_token="s3cret")
    layout = replace(Layout.new(config.stack_dir), secret="t0p")
    names = ["redis", "arena", "prefill", "decode", "gateway", "orchestrator"]
    ports = {n: (1000 + i, 2000 + i) for i, n in enumerate(names)}
    stages = stack.plan(config, layout, ports)
    assert [[p.name for p in s] for s in stages] == \
        [["redis"], ["arena"], ["prefill", "decode"], ["gateway", "orchestrator"]]
    by_name = {p.name: p for s in stages for p in s}
    argv = {n: " ".join(p.argv) for n, p in by_name.items()}
    redis_url = "redis://:t0p@127.0.0.1:1000/0"              # the stack's Redis wants its secret
    assert "--port 1000" in argv["redis"] and "--bind 127.0.0.1" in argv["redis"]
    assert by_name["redis"].argv[1] == str(config.stack_dir / "redis" / "auth.conf")   # requirepass, from a file
    assert by_name["redis"].health == "redis"
    for name in names[1:]:
        assert dict(by_name[name].env)["REDIS_URL"] == redis_url and "--redis-url" not in argv[name]
        assert f"--key-prefix {layout.key_prefix}" in argv[name]
        assert f"--port {by_name[name].port} --metrics-port {by_name[name].metrics_port}" in argv[name]
    assert f"--stack-id {layout.stack_id}" in argv["arena"] and "--num-kv-blocks 64" in argv["arena"]
    assert f"--socket {layout.arena_socket}" in argv["arena"]
    assert f"--arena-socket {layout.arena_socket}" in argv["prefill"]
    assert "--cpus 0" in argv["prefill"].split(" --cache-dir")[1] and "--cpus 1" in argv["decode"]
    assert "-m services.gateway.main" in argv["gateway"]
    assert "-m orchestrator.main" in argv["orchestrator"] and "--cpus 0,1" in argv["orchestrator"]
    assert not any("s3cret" in a or "t0p" in a for a in argv.values())            # secrets go by environment
    assert dict(by_name["orchestrator"].env) == {"REDIS_URL": redis_url, "DUOSERVE_SECRET": "t0p",
                                                 "DUOSERVE_ADMIN_TOKEN": "s3cret"}
    for name in ("prefill", "decode"):
        assert dict(by_name[name].env)["DUOSERVE_SECRET"] == "t0p"
    assert "DUOSERVE_SECRET" not in dict(by_name["gateway"].env) and "DUOSERVE_SECRET" not in dict(by_name["arena"].env)
    assert layout.segment_prefix == f"duoserve-{layout.stack_id}-"
    assert stack.stage_names(make_config(tmp_path, with_orchestrator=False))[-1] == ("gateway",)


def test_colocated_plan_and_external_redis(tmp_path):
    config = make_config(tmp_path, mode=Mode.COLOCATED, redis_url="redis://10.0.0.1:7000/2", chunk_size=256)
    assert stack.stage_names(config) == (("colocated",), ("gateway",))
    layout = Layout.new(config.stack_dir)
    stages = stack.plan(config, layout, {"colocated": (1, 2), "gateway": (3, 4)})
    colocated = " ".join(stages[0][0].argv)
    assert dict(stages[0][0].env)["REDIS_URL"] == "redis://10.0.0.1:7000/2" and "--chunk-size 256" in colocated
    assert "--arena-socket" not in colocated and "-m services.colocated.main" in colocated
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    assert f"--cpus {cores}" in colocated


def test_gateway_gets_its_http_port_and_every_metrics_endpoint(tmp_path):
    config = make_config(tmp_path, cpus=(0, 1))
    names = [n for stage in stack.stage_names(config) for n in stage]
    assert [stack.ports_needed(n) for n in names] == [3 if n == "gateway" else 2 for n in names]
    ports = {n: tuple(1000 + 10 * i + k for k in range(stack.ports_needed(n))) for i, n in enumerate(names)}
    by_name = {p.name: p for s in stack.plan(config, Layout.new(config.stack_dir), ports) for p in s}
    gateway = " ".join(by_name["gateway"].argv)
    assert by_name["gateway"].http_port == ports["gateway"][2] and f"--http-port {ports['gateway'][2]}" in gateway
    for name in ("arena", "prefill", "decode", "orchestrator"):
        assert f"--peer-metrics {name}=127.0.0.1:{ports[name][1]}" in gateway
    assert "redis=" not in gateway and "gateway=" not in gateway


def test_two_cores_split_prefill_core_0_decode_core_1(tmp_path):
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("cores 0 and 1 not both available")
    assert make_config(tmp_path, cpus=(0, 1)).worker_cpus() == {"prefill": (0,), "decode": (1,)}
    assert make_config(tmp_path, cpus=(0,)).worker_cpus() == {"prefill": (0,), "decode": (0,)}
    assert make_config(tmp_path, cpus=(0, 1), decode_cpus=(0,)).worker_cpus() == {"prefill": (0,), "decode": (0,)}


def test_config_refuses_bad_names_and_unavailable_cores(tmp_path):
    with pytest.raises(ValueError, match="stack name"):
        make_config(tmp_path, name="../etc")
    with pytest.raises(ValueError, match="not all available"):
        make_config(tmp_path, cpus=(10_000,))


def test_long_state_dir_moves_the_arena_socket_to_tmp(tmp_path):
    layout = Layout.new(tmp_path / ("x" * 120))
    assert len(str(layout.arena_socket)) <= stack.UNIX_SOCKET_PATH_MAX
    assert layout.arena_socket.parent.name == layout.stack_id     # a directory of its own, made private by the arena


# ---------------------------------------------------------------------------------------------
# State file, ports, the CLI's imports and config
# ---------------------------------------------------------------------------------------------

def test_state_file_round_trips(tmp_path):
    record = stack.ProcessRecord("gateway", 123, 456, 3, 5000, 5001, "grpc", "/x/gateway.log", ("python", "-m", "g"))
    state = stack.StackState(name="default", mode="split", stack_id="abc", key_prefix="duo:abc",
                             segment_prefix="duoserve-abc-", redis_url="redis://127.0.0.1:1/0", owns_redis=True,
                             arena_socket="/x/arena.sock", gateway_target="127.0.0.1:5000", supervisor_pid=None,
                             supervisor_start_time=None, created_at=1.5, processes=(record,))
    path = tmp_path / "state.json"
    stack.write_state(path, state)
    assert stack.read_state(path) == state
    assert json.loads(path.read_text())["processes"][0]["pid"] == 123
    assert stack.read_state(tmp_path / "missing.json") is None
    path.write_text("{not json")
    with pytest.raises(StackError, match="unreadable state file"):
        stack.read_state(path)


def test_free_ports_are_distinct_and_bindable():
    ports = stack.pick_free_ports(8)
    assert len(set(ports)) == 8
    assert not any(stack.port_in_use(p) for p in ports)


def test_remove_segments_refuses_a_broad_prefix():
    for prefix in ("", "duoserve-", "/"):
        with pytest.raises(ValueError):
            stack.remove_segments(prefix)


def test_cli_paths_import_no_torch():
    code = ("import sys, duoserve.cli, duoserve.remote, duoserve.stack; "
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_builds_the_stack_config(tmp_path, monkeypatch):
    from duoserve.cli import build_parser, stack_config_from_args
    monkeypatch.setenv("DUOSERVE_STATE_DIR", str(tmp_path / "s"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    args = build_parser().parse_args(["up", "--mode", "colocated", "--cpus", "0", "--num-kv-blocks", "32",
                                      "--name", "b", "--detach"])
    config = stack_config_from_args(args)
    assert (config.state_dir, config.name, config.mode, config.cpus, config.num_kv_blocks, config.redis_url) == \
        (tmp_path / "s", "b", Mode.COLOCATED, (0,), 32, None)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert stack_config_from_args(build_parser().parse_args(["up"])).redis_url == "redis://127.0.0.1:1/0"


def test_up_serves_on_50051_and_8000_unless_told(monkeypatch):
    from duoserve.cli import build_parser, stack_config_from_args
    for var in ("DUOSERVE_PORT", "DUOSERVE_HTTP_PORT", "DUOSERVE_HOST", "DUOSERVE_STACK"):
        monkeypatch.delenv(var, raising=False)
    config = stack_config_from_args(build_parser().parse_args(["up"]))
    assert (config.host, config.port, config.http_port, config.name) == ("127.0.0.1", 50051, 8000, "default")
    config = stack_config_from_args(build_parser().parse_args(["up", "--host", "0.0.0.0", "--port", "0",
                                                               "--http-port", "9000"]))
    assert (config.host, config.port, config.http_port, config.connect_host) == ("0.0.0.0", 0, 9000, "127.0.0.1")
    monkeypatch.setenv("DUOSERVE_STACK", "x")
    monkeypatch.setenv("DUOSERVE_PORT", "6000")
    config = stack_config_from_args(build_parser().parse_args(["up"]))
    assert (config.name, config.port) == ("x", 6000)


def test_a_taken_port_is_one_line_naming_the_flag(tmp_path, capsys):
    import socket
    from duoserve.cli import main
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["up", "--state-dir", str(tmp_path), "--port", str(port), "--http-port", "0",
                     "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err and "already in use" in err, err


@pytest.mark.parametrize("argv", [["status", "--name", "nope"], ["--name", "nope", "status"]])
def test_duoctl_takes_the_stack_name_before_or_after_the_command(argv, tmp_path, capsys):
    from duoserve.duoctl import main
    assert main(["--state-dir", str(tmp_path), *argv]) != 0
    assert "no stack 'nope'" in capsys.readouterr().err


def test_generate_and_bench_serve_find_a_stack_by_name(tmp_path, capsys):
    from duoserve.cli import main
    assert main(["generate", "--state-dir", str(tmp_path), "--name", "nope", "hi"]) == 2
    assert main(["bench", "serve", "--state-dir", str(tmp_path), "--name", "nope"]) == 2
    assert capsys.readouterr().err.count("no stack 'nope' is running here") == 2


def test_targets_without_a_port_mean_50051():
    from duoserve.targets import with_default_port
    assert [with_default_port(t) for t in ("localhost", "10.0.0.1:7", "[::1]", "[::1]:9", "http://h:8000")] == \
        ["localhost:50051", "10.0.0.1:7", "[::1]:50051", "[::1]:9", "http://h:8000"]


# ---------------------------------------------------------------------------------------------
# Real stacks: helpers
# ---------------------------------------------------------------------------------------------

def quiet(message: str) -> None:
    print(message, file=sys.stderr)


def gone(pid: int) -> bool:
    return stack.process_start_time(pid) is None


def processes_of(key_prefix: str) -> list[int]:
    """Live processes whose command line names this stack's key prefix: every one but redis-server, which
    rewrites its title (a zombie's command line is empty)."""
    needle = f"--key-prefix {key_prefix} "
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(proc.name))
    return found


def listening(port: int) -> bool:
    """Whether a socket still listens on `port` on the loopback. A bind with SO_REUSEADDR, as servers do:
    connections left in TIME_WAIT by a killed server do not count (stack.port_in_use counts them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((stack.LOOPBACK, port))
        except OSError:
            return True
    return False


def redis_pid(log: Path) -> int:
    """The pid a redis-server logged at start-up."""
    return int(re.findall(r"pid=(\d+), just started", log.read_text())[-1])


def launched_argv(log: Path) -> list[str]:
    """The command line of the last launch recorded in a stack log (its "--- <date> <time> argv" line)."""
    header = [line for line in log.read_text().splitlines() if line.startswith("--- ")][-1]
    return header.split()[3:]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def assert_all_gone(state: stack.StackState, stack_dir: Path) -> None:
    for r in state.processes:
        deadline = time.monotonic() + 5
        while not gone(r.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(r.pid), f"{r.name} (pid {r.pid}) still running"
        while listening(r.port) and time.monotonic() < deadline + 10:   # the kernel closes it after the reap
            time.sleep(0.05)
        assert not listening(r.port), f"{r.name}'s port {r.port} still taken"
    assert processes_of(state.key_prefix) == []
    assert not list(stack.SHM_DIR.glob(f"{state.segment_prefix}*"))
    assert state.arena_socket is None or not Path(state.arena_socket).exists()
    assert not (stack_dir / stack.STATE_FILE).exists()


def process_names(mode: str) -> list[str]:
    """Every process a stack of `mode` with its own Redis runs, in start order."""
    config = StackConfig(state_dir=Path("/nonexistent"), cache_dir=Path("/nonexistent"), mode=Mode(mode))
    return [n for stage in stack.stage_names(config) for n in stage]


def cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duoserve.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_env(state_dir: Path) -> dict[str, str]:
    """Free ports instead of 50051/8000: stacks of several tests (and a user's) may run at once."""
    env = {**os.environ, "DUOSERVE_STATE_DIR": str(state_dir), "DUOSERVE_PORT": "0", "DUOSERVE_HTTP_PORT": "0"}
    env.pop("DUOSERVE_STACK", None)
    env.pop("REDIS_URL", None)
    return env


def model_args(default_model_dir: Path) -> tuple[str, ...]:
    """The session's converted model (no conversion at start-up) and a small KV pool."""
    return ("--cache-dir", str(default_model_dir.parent), "--num-kv-blocks", "128")


# ---------------------------------------------------------------------------------------------
# Real stacks from the command line
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@needs_redis
@pytest.mark.parametrize("mode", ["split", "colocated"])
def test_up_generate_down_real_stack(mode, default_model_dir, tmp_path):
    state_dir = tmp_path / "state"
    env = cli_env(state_dir)
    up = cli("up", "--detach", "--mode", mode, *model_args(default_model_dir), "--startup-timeout", "500",
             env=env, timeout=600)
    state = stack.read_state(state_dir / "default" / stack.STATE_FILE)
    try:
        assert up.returncode == 0, up.stderr
        target = up.stdout.strip()
        assert target == state.gateway_target
        assert [r.name for r in state.processes] == process_names(mode)
        assert state.owns_redis and all(Path(r.log).exists() for r in state.processes)
        assert sorted(processes_of(state.key_prefix)) == sorted(r.pid for r in state.processes if r.name != "redis")

        status = cli("status", "--json", env=env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert [(p["name"], p["alive"], p["health"]) for p in report["processes"]] == \
            [(n, True, "SERVING") for n in process_names(mode)]

        answer = cli("generate", "--target", target, "--max-tokens", "32", "What is the capital of France?",
                     env=env, timeout=300)
        assert answer.returncode == 0, answer.stderr
        assert "Paris" in answer.stdout

        again = cli("up", "--detach", "--mode", mode, env=env, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = cli("down", env=env, timeout=300)
    assert down.returncode == 0, down.stderr
    assert state is not None
    assert_all_gone(state, state_dir / "default")
    assert not (state_dir / "default" / "redis").exists()
    nothing = cli("down", env=env, timeout=60)
    assert nothing.returncode == 1 and "no stack named 'default'" in nothing.stderr


@pytest.mark.slow
@needs_redis
def test_a_model_that_does_not_exist_stops_the_start_and_shows_the_arena_log(default_model_dir, tmp_path):
    state_dir = tmp_path / "state"
    up = cli("up", "--detach", "--model", "/nonexistent", *model_args(default_model_dir), env=cli_env(state_dir),
             timeout=300)
    assert up.returncode == 1
    assert "arena exited with status 1 while starting" in up.stderr
    assert "model '/nonexistent' not found" in up.stderr                  # the arena's own words, from its log
    stack_dir = state_dir / "default"
    logs = stack_dir / "logs"
    assert {p.name for p in logs.iterdir()} == {"redis.log", "arena.log"}  # the workers were never started
    arena = launched_argv(logs / "arena.log")
    assert processes_of(flag(arena, "--key-prefix")) == []
    assert gone(redis_pid(logs / "redis.log"))
    assert not listening(int(flag(launched_argv(logs / "redis.log"), "--port")))
    assert not list(stack.SHM_DIR.glob(f"duoserve-{flag(arena, '--stack-id')}-*"))
    assert not (stack_dir / stack.STATE_FILE).exists() and not (stack_dir / "redis").exists()


@pytest.mark.slow
@needs_redis
def test_a_start_past_its_deadline_names_the_process_not_ready_and_stops_everything(default_model_dir, tmp_path):
    state_dir = tmp_path / "state"
    up = cli("up", "--detach", *model_args(default_model_dir), "--startup-timeout", "1.5", "--stop-timeout", "5",
             env=cli_env(state_dir), timeout=300)
    assert up.returncode == 1
    assert re.search(r"arena not SERVING after 1\.5 s \(health: (UNREACHABLE|NOT_SERVING)\)", up.stderr), up.stderr
    assert "start failed: stopping what was started" in up.stderr
    stack_dir = state_dir / "default"
    logs = stack_dir / "logs"
    arena = launched_argv(logs / "arena.log")
    assert processes_of(flag(arena, "--key-prefix")) == []
    assert gone(redis_pid(logs / "redis.log"))
    assert not listening(int(flag(arena, "--port")))
    assert not list(stack.SHM_DIR.glob(f"duoserve-{flag(arena, '--stack-id')}-*"))
    assert not (stack_dir / stack.STATE_FILE).exists()


@pytest.mark.slow
@needs_redis
@pytest.mark.parametrize("how", ["ctrl-c", "down"])
def test_foreground_up_tears_down_on_ctrl_c_or_down(how, default_model_dir, tmp_path):
    state_dir, stack_dir = tmp_path / "state", tmp_path / "state" / "default"
    env = cli_env(state_dir)
    with open(tmp_path / "up.err", "w+") as err:
        up = subprocess.Popen([sys.executable, "-m", "duoserve.cli", "up", "--mode", "colocated",
                               *model_args(default_model_dir), "--startup-timeout", "300"],
                              env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            target = up.stdout.readline().strip()          # printed once every process is SERVING
            assert target.startswith("127.0.0.1:"), (tmp_path / "up.err").read_text()
            state = stack.read_state(stack_dir / stack.STATE_FILE)
            assert state.supervisor_pid == up.pid
            assert [r.name for r in state.processes] == process_names("colocated")
            if how == "ctrl-c":
                up.send_signal(signal.SIGINT)
            else:
                down = cli("down", env=env, timeout=120)
                assert down.returncode == 0, down.stderr
            assert up.wait(60) == 0, (tmp_path / "up.err").read_text()
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    assert_all_gone(state, stack_dir)


# ---------------------------------------------------------------------------------------------
# "beside": a second split stack in the session split stack's Redis, started with a port taken
# ---------------------------------------------------------------------------------------------

@dataclass
class Beside:
    config: StackConfig
    state: stack.StackState
    said: list[str]                # what `up` said while starting
    taken_port: int                # the port planned for the arena, held by another listener during `up`


def first_call_takes(real: Callable[..., list[int]], index: int, port: int) -> Callable[..., list[int]]:
    """`pick_free_ports` whose first answer has `port` (already taken) at `index`; later calls are the real one."""
    calls = 0

    def pick(n: int, avoid=()) -> list[int]:
        nonlocal calls
        calls += 1
        ports = real(n, avoid)
        if calls == 1:
            ports[index] = port
        return ports
    return pick


@pytest.fixture(scope="module")
def beside(split_stack, default_model_dir, tmp_path_factory):
    """Started by `stack.up` while another socket listens on the port its plan gives the arena (the gRPC
    servers bind without SO_REUSEPORT, so the arena exits and the supervisor relaunches it on new ports).
    The last test of this file stops it; down here is for a run that ends before."""
    config = StackConfig(state_dir=tmp_path_factory.mktemp("beside"), cache_dir=default_model_dir.parent,
                         name="beside", redis_url=split_stack.state.redis_url, num_kv_blocks=128,
                         startup_timeout_s=300, stop_timeout_s=5,
                         restart="never")      # its last test kills processes to see `down` clean up after them
    names = [n for stage in stack.stage_names(config) for n in stage]     # the launcher's port order
    said: list[str] = []

    def say(message: str) -> None:
        said.append(message)
        quiet(message)

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken, pytest.MonkeyPatch.context() as patch:
        taken.bind((stack.LOOPBACK, 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        patch.setattr(stack, "pick_free_ports",
                      first_call_takes(stack.pick_free_ports, 2 * names.index("arena"), taken_port))
        stack.up(config, detach=True, say=say)
    yield Beside(config, stack.read_state(config.state_path), said, taken_port)
    stack.down(config.state_dir, config.name, stop_timeout_s=1.0, say=quiet)


def record(state: stack.StackState, name: str) -> stack.ProcessRecord:
    return next(r for r in state.processes if r.name == name)


@pytest.mark.slow
@needs_redis
def test_a_taken_port_relaunches_the_process_on_a_new_one(beside):
    arena = record(beside.state, "arena")
    assert f"arena: port taken, retrying on {arena.port}" in beside.said
    assert arena.port != beside.taken_port
    log = Path(arena.log).read_text()
    first_launch = log.split("\n--- ")[0]
    assert re.search(rf"(Failed to bind to address|cannot listen on) 127.0.0.1:{beside.taken_port}\b", first_launch)
    assert sum(line.startswith("--- ") for line in log.splitlines()) == 2       # two launches, one log
    assert [(p.name, p.health) for p in stack.stack_status(beside.state)] == \
        [(r.name, "SERVING") for r in beside.state.processes]


@pytest.mark.slow
@needs_redis
def test_two_stacks_side_by_side_in_one_redis(beside, split_stack):
    assert not beside.state.owns_redis and beside.state.redis_url == split_stack.state.redis_url
    assert "redis" not in [r.name for r in beside.state.processes]
    assert beside.state.key_prefix != split_stack.state.key_prefix
    out = io.StringIO()
    assert stack.status(beside.config.state_dir, "beside", as_json=True, out=out) == 0
    assert json.loads(out.getvalue())["owns_redis"] is False
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = []
    for target in (beside.state.gateway_target, split_stack.target):
        with duoserve.Client(target, timeout=120) as client:
            answers.append(list(client.generate(messages=prompt, max_tokens=8, temperature=0).token_ids))
    assert answers[0] == answers[1] and len(answers[0]) == 8              # same model, same greedy tokens


@pytest.mark.slow
@needs_redis
def test_a_recycled_pid_is_never_signalled(beside):
    gateway = record(beside.state, "gateway")
    assert stack.is_alive(gateway.pid, gateway.start_time)
    assert not stack.is_alive(gateway.pid, gateway.start_time + 1)       # same pid, another process
    stack.signal_process(gateway.pid, gateway.start_time + 1, signal.SIGKILL)
    time.sleep(0.2)
    assert stack.is_alive(gateway.pid, gateway.start_time)
    assert stack.grpc_health(gateway.target) == "SERVING"


@pytest.mark.slow
@needs_redis
def test_down_kills_a_stopped_worker_and_cleans_up_after_a_dead_arena(beside, split_stack):
    """Stops "beside": keep it the last test using it."""
    state, stack_dir = beside.state, beside.config.stack_dir
    arena, decode = record(state, "arena"), record(state, "decode")
    assert list(stack.SHM_DIR.glob(f"{state.segment_prefix}*")) and Path(state.arena_socket).exists()
    assert sorted(processes_of(state.key_prefix)) == sorted(r.pid for r in state.processes)
    others = {"segments": sorted(stack.SHM_DIR.glob(f"{split_stack.state.segment_prefix}*")),
              "free_blocks": split_stack.num_free_blocks()}
    split_stack.redis.set("someone-else", "1")
    try:
        os.kill(decode.pid, signal.SIGSTOP)        # SIGTERM stays pending: only SIGKILL ends it
        os.kill(arena.pid, signal.SIGKILL)         # no cleanup: its segments and socket stay behind
        deadline = time.monotonic() + 5
        while not gone(arena.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = io.StringIO()
        assert stack.status(beside.config.state_dir, "beside", as_json=True, out=out) == 1
        health = {p["name"]: (p["alive"], p["health"]) for p in json.loads(out.getvalue())["processes"]}
        assert health["arena"] == (False, "DEAD") and health["decode"][1] != "SERVING"
        assert list(stack.SHM_DIR.glob(f"{state.segment_prefix}*")) and Path(state.arena_socket).exists()

        said: list[str] = []
        assert stack.down(beside.config.state_dir, "beside", stop_timeout_s=1.0, say=said.append) == 0
        assert f"decode (pid {decode.pid}) did not stop within 1 s: killed" in said
        assert not any("arena" in m and "killed" in m for m in said)    # already dead: nothing to stop
        assert_all_gone(state, stack_dir)
        assert split_stack.redis.keys(f"{state.key_prefix}:*") == []     # only this stack's keys went
        assert split_stack.redis.get("someone-else") == b"1"
        assert sorted(stack.SHM_DIR.glob(f"{split_stack.state.segment_prefix}*")) == others["segments"]
        assert split_stack.num_free_blocks() == others["free_blocks"]
        assert all(p.health == "SERVING" for p in stack.stack_status(split_stack.state))
        assert stack.down(beside.config.state_dir, "beside", stop_timeout_s=1.0, say=said.append) == 1
    finally:
        split_stack.redis.delete("someone-else")
        stack.signal_process(decode.pid, decode.start_time, signal.SIGCONT)     # if still there: let the fixture stop it
