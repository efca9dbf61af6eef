"""`duoserve up / status / down` and `generate --target`.

The fast tests drive the supervisor with stand-in services (a real redis-server, and small gRPC
health servers in place of arena, workers and gateway): planning, the state file, ports, start-up
failures, refusal of a second stack, teardown. The slow ones start the real stack from the CLI,
ask it a question through the SDK, and check that `down` leaves no process, port or segment.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duoserve import stack
from duoserve.stack import Layout, Mode, ProcessSpec, StackConfig, StackError

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

FAKE_SERVICE = textwrap.dedent('''
    """A stand-in service: grpc.health.v1 on --port, SERVING after a moment; BEHAVIOUR varies it."""
    import signal, sys, time
    from concurrent import futures
    from pathlib import Path
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    behaviour, port = sys.argv[1], int(sys.argv[sys.argv.index("--port") + 1])
    if behaviour == "fail":
        print("Traceback (most recent call last):\\nRuntimeError: the model would not load", flush=True)
        sys.exit(3)
    if behaviour.startswith("collide-once:"):
        marker = Path(behaviour.split(":", 1)[1])
        if not marker.exists():
            marker.touch()
            print(f"OSError: [Errno 98] Address already in use (port {port})", flush=True)
            sys.exit(1)
    if behaviour == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    time.sleep(0.3)
    if behaviour != "never-ready":
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("serving", port, flush=True)
    while True:
        time.sleep(1)
''')


def make_config(tmp_path: Path, **overrides) -> StackConfig:
    return StackConfig(**{"state_dir": tmp_path / "state", "cache_dir": tmp_path / "models",
                          "startup_timeout_s": 30.0, "stop_timeout_s": 3.0, **overrides})


def sleeper(ignore_term: bool = False) -> subprocess.Popen:
    code = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + "print('up', flush=True)\ntime.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert p.stdout.readline() == b"up\n"      # its handlers are installed
    return p


def gone(pid: int) -> bool:
    return stack.process_start_time(pid) is None


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

def test_split_plan_starts_redis_arena_workers_gateway_in_order(tmp_path):
    config = make_config(tmp_path, cpus=(0, 1), num_kv_blocks=64)
    layout = Layout.new(config.stack_dir)
    ports = {n: (1000 + i, 2000 + i) for i, n in enumerate(["redis", "arena", "prefill", "decode", "gateway"])}
    stages = stack.plan(config, layout, ports)
    assert [[p.name for p in s] for s in stages] == [["redis"], ["arena"], ["prefill", "decode"], ["gateway"]]
    by_name = {p.name: p for s in stages for p in s}
    argv = {n: " ".join(p.argv) for n, p in by_name.items()}
    redis_url = "redis://127.0.0.1:1000/0"
    assert "--port 1000" in argv["redis"] and "--bind 127.0.0.1" in argv["redis"]
    assert by_name["redis"].health == "redis"
    for name in ("arena", "prefill", "decode", "gateway"):
        assert f"--redis-url {redis_url}" in argv[name]
        assert f"--key-prefix {layout.key_prefix}" in argv[name]
        assert f"--port {by_name[name].port} --metrics-port {by_name[name].metrics_port}" in argv[name]
    assert f"--stack-id {layout.stack_id}" in argv["arena"] and "--num-kv-blocks 64" in argv["arena"]
    assert f"--socket {layout.arena_socket}" in argv["arena"]
    assert f"--arena-socket {layout.arena_socket}" in argv["prefill"]
    assert "--cpus 0" in argv["prefill"].split(" --cache-dir")[1] and "--cpus 1" in argv["decode"]
    assert "-m services.gateway.main" in argv["gateway"]
    assert layout.segment_prefix == f"duoserve-{layout.stack_id}-"


def test_colocated_plan_and_external_redis(tmp_path):
    config = make_config(tmp_path, mode=Mode.COLOCATED, redis_url="redis://10.0.0.1:7000/2", chunk_size=256)
    assert stack.stage_names(config) == (("colocated",), ("gateway",))
    layout = Layout.new(config.stack_dir)
    stages = stack.plan(config, layout, {"colocated": (1, 2), "gateway": (3, 4)})
    colocated = " ".join(stages[0][0].argv)
    assert "--redis-url redis://10.0.0.1:7000/2" in colocated and "--chunk-size 256" in colocated
    assert "--arena-socket" not in colocated and "-m services.colocated.main" in colocated
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    assert f"--cpus {cores}" in colocated


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
# State file, ports, processes
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


def test_start_time_tells_a_process_from_a_recycled_pid():
    p = sleeper()
    try:
        start = stack.process_start_time(p.pid)
        assert stack.is_alive(p.pid, start)
        assert not stack.is_alive(p.pid, start + 1)      # same pid, another process: never signalled
        stack._signal(p.pid, start + 1, signal.SIGKILL)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()
    assert not stack.is_alive(p.pid, start)


def test_stop_processes_terms_then_kills():
    polite, stubborn = sleeper(), sleeper(ignore_term=True)
    procs = [(p.pid, stack.process_start_time(p.pid)) for p in (polite, stubborn)]
    t0 = time.monotonic()
    killed = stack.stop_processes(procs, timeout_s=1.0)
    assert killed == [stubborn.pid]
    assert 1.0 <= time.monotonic() - t0 < 8
    assert polite.wait(5) == 0 or polite.returncode == -signal.SIGTERM
    assert stubborn.wait(5) == -signal.SIGKILL


def test_teardown_cleans_up_even_when_processes_already_died(tmp_path):
    alive, dead = sleeper(), sleeper()
    dead_start = stack.process_start_time(dead.pid)
    dead.kill()
    dead.wait()
    stack_id = f"test{os.getpid()}"
    segment = stack.SHM_DIR / f"duoserve-{stack_id}-kv"
    segment.write_bytes(b"\0" * 16)
    other = stack.SHM_DIR / f"duoserve-{stack_id}x-kv"          # another stack's: must stay
    other.write_bytes(b"\0")
    sock = tmp_path / "arena.sock"
    sock.write_text("")
    records = tuple(stack.ProcessRecord(n, p.pid, s, i, 0, 0, "grpc", "/dev/null", ())
                    for i, (n, p, s) in enumerate([("arena", dead, dead_start),
                                                   ("gateway", alive, stack.process_start_time(alive.pid))]))
    state = stack.StackState(name="t", mode="split", stack_id=stack_id, key_prefix=f"duo:{stack_id}",
                             segment_prefix=f"duoserve-{stack_id}-", redis_url="redis://127.0.0.1:1/0",
                             owns_redis=True, arena_socket=str(sock), gateway_target=None, supervisor_pid=None,
                             supervisor_start_time=None, created_at=0.0, processes=records)
    path = tmp_path / "state.json"
    stack.write_state(path, state)
    try:
        stack.teardown(state, path, 2.0, say=lambda m: None)
        assert alive.wait(5) is not None
        assert not segment.exists() and not sock.exists() and not path.exists()
        assert other.exists()
    finally:
        other.unlink(missing_ok=True)
        segment.unlink(missing_ok=True)


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


# ---------------------------------------------------------------------------------------------
# up / status / down with stand-in services (real redis-server)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_services(tmp_path, monkeypatch):
    """Replace every process but redis by FAKE_SERVICE; returns {name: behaviour} to adjust."""
    script = tmp_path / "fake_service.py"
    script.write_text(FAKE_SERVICE)
    behaviour: dict[str, str] = {}
    real = stack.process_spec

    def fake_spec(name, config, layout, ports):
        if name == "redis":
            return real(name, config, layout, ports)
        port, metrics_port = ports[name]
        return ProcessSpec(name, (sys.executable, str(script), behaviour.get(name, "ok"), "--port", str(port)),
                           port, metrics_port)

    monkeypatch.setattr(stack, "process_spec", fake_spec)
    return behaviour


def quiet(message: str) -> None:
    print(message, file=sys.stderr)


def assert_all_gone(state: stack.StackState) -> None:
    for r in state.processes:
        deadline = time.monotonic() + 5
        while not gone(r.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(r.pid), f"{r.name} (pid {r.pid}) still running"
        assert not stack.port_in_use(r.port), f"{r.name}'s port {r.port} still taken"


@needs_redis
def test_up_detached_status_down_with_stand_ins(tmp_path, fake_services, capsys):
    config = make_config(tmp_path)
    assert stack.up(config, detach=True, say=quiet) == 0
    state = stack.read_state(config.state_path)
    try:
        target = capsys.readouterr().out.strip()
        assert target == state.gateway_target and target.startswith("127.0.0.1:")
        assert [r.name for r in state.processes] == ["redis", "arena", "prefill", "decode", "gateway"]
        assert state.owns_redis and state.redis_url.startswith("redis://127.0.0.1:")
        assert all(Path(r.log).exists() for r in state.processes)

        assert stack.status(config.state_dir, "default", as_json=True) == 0
        report = json.loads(capsys.readouterr().out)
        assert [(p["name"], p["alive"], p["health"]) for p in report["processes"]] == \
            [(n, True, "SERVING") for n in ("redis", "arena", "prefill", "decode", "gateway")]

        with pytest.raises(StackError, match="already running"):
            stack.up(config, detach=True, say=quiet)

        os.kill(next(r.pid for r in state.processes if r.name == "decode"), signal.SIGKILL)   # one dies
        time.sleep(0.2)
        assert stack.status(config.state_dir, "default", as_json=False) == 1
        assert "decode" in capsys.readouterr().out
    finally:
        assert stack.down(config.state_dir, "default", stop_timeout_s=3.0, say=quiet) == 0
    assert_all_gone(state)
    assert not config.state_path.exists() and not (config.stack_dir / "redis").exists()
    assert stack.down(config.state_dir, "default", stop_timeout_s=3.0, say=quiet) == 1   # nothing to stop


@needs_redis
def test_failed_start_stops_everything_and_shows_the_log_tail(tmp_path, fake_services):
    fake_services["decode"] = "fail"
    config = make_config(tmp_path)
    with pytest.raises(StackError, match=r"decode exited with status 3(.|\n)*the model would not load"):
        stack.up(config, detach=True, say=quiet)
    assert not config.state_path.exists()
    logs = config.stack_dir / "logs"
    assert {p.name for p in logs.iterdir()} >= {"redis.log", "arena.log", "prefill.log", "decode.log"}
    for line in (logs / "prefill.log").read_text().splitlines():
        if line.startswith("serving"):
            assert not stack.port_in_use(int(line.split()[1]))


@needs_redis
def test_start_deadline_names_the_process_that_is_not_ready(tmp_path, fake_services):
    fake_services["gateway"] = "never-ready"
    config = make_config(tmp_path, startup_timeout_s=4.0, mode=Mode.COLOCATED)
    with pytest.raises(StackError, match=r"gateway not SERVING after 4 s \(health: NOT_SERVING\)"):
        stack.up(config, detach=True, say=quiet)
    assert not config.state_path.exists()


@needs_redis
def test_port_collision_relaunches_on_new_ports(tmp_path, fake_services, capsys):
    fake_services["arena"] = f"collide-once:{tmp_path / 'collided'}"
    config = make_config(tmp_path)
    stack.up(config, detach=True, say=quiet)
    try:
        assert (tmp_path / "collided").exists()
        assert "arena: port taken" in capsys.readouterr().err
        assert stack.status(config.state_dir, "default", as_json=True) == 0
    finally:
        stack.down(config.state_dir, "default", stop_timeout_s=3.0, say=quiet)


@needs_redis
def test_stubborn_process_is_killed_and_names_can_run_side_by_side(tmp_path, fake_services):
    fake_services["gateway"] = "ignore-term"
    a, b = make_config(tmp_path, name="a", stop_timeout_s=1.0), make_config(tmp_path, name="b", stop_timeout_s=1.0)
    stack.up(a, detach=True, say=quiet)
    try:
        stack.up(b, detach=True, say=quiet)
    finally:
        said: list[str] = []
        stack.down(a.state_dir, "a", stop_timeout_s=1.0, say=said.append)
        stack.down(b.state_dir, "b", stop_timeout_s=1.0, say=said.append)
    assert sum("did not stop within 1 s: killed" in m for m in said) == 2


@needs_redis
def test_external_redis_is_left_running_with_only_our_keys_deleted(tmp_path, fake_services):
    import redis
    external = stack.pick_free_ports(1)[0]
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(external), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{external}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.set("someone-else", "1")
        config = make_config(tmp_path, redis_url=url)
        stack.up(config, detach=True, say=quiet)
        state = stack.read_state(config.state_path)
        assert not state.owns_redis and state.redis_url == url
        assert "redis" not in [r.name for r in state.processes]
        client.set(f"{state.key_prefix}:prefill:queue", "x")
        stack.down(config.state_dir, "default", stop_timeout_s=3.0, say=quiet)
        assert server.poll() is None
        assert client.get("someone-else") == b"1"
        assert client.keys(f"{state.key_prefix}:*") == []
    finally:
        server.terminate()
        server.wait(10)


FOREGROUND_DRIVER = textwrap.dedent('''
    import sys
    from pathlib import Path
    from duoserve import stack
    script = Path(sys.argv[1])
    real = stack.process_spec
    def fake_spec(name, config, layout, ports):
        if name == "redis":
            return real(name, config, layout, ports)
        port, mport = ports[name]
        return stack.ProcessSpec(name, (sys.executable, str(script), "ok", "--port", str(port)), port, mport)
    stack.process_spec = fake_spec
    config = stack.StackConfig(state_dir=Path(sys.argv[2]), cache_dir=Path(sys.argv[2]), stop_timeout_s=3.0,
                               mode=stack.Mode(sys.argv[3]))
    sys.exit(stack.up(config, detach=False, say=lambda m: print(m, file=sys.stderr, flush=True)))
''')


@needs_redis
@pytest.mark.parametrize("how", ["sigint", "down"])
def test_foreground_up_tears_down_on_ctrl_c_or_down(tmp_path, how):
    script, driver, state_dir = tmp_path / "fake_service.py", tmp_path / "driver.py", tmp_path / "state"
    script.write_text(FAKE_SERVICE)
    driver.write_text(FOREGROUND_DRIVER)
    up = subprocess.Popen([sys.executable, str(driver), str(script), str(state_dir), "colocated"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        target = up.stdout.readline().strip()
        assert target.startswith("127.0.0.1:"), up.stderr.read() if up.poll() is not None else target
        state = stack.read_state(state_dir / "default" / stack.STATE_FILE)
        assert state.supervisor_pid == up.pid
        assert [r.name for r in state.processes] == ["redis", "colocated", "gateway"]
        if how == "sigint":
            up.send_signal(signal.SIGINT)
            assert up.wait(30) == 0
        else:
            assert stack.down(state_dir, "default", stop_timeout_s=3.0, say=quiet) == 0
            assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert_all_gone(state)
    assert not (state_dir / "default" / stack.STATE_FILE).exists()


# ---------------------------------------------------------------------------------------------
# The real stack, from the command line
# ---------------------------------------------------------------------------------------------

def cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duoserve.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@needs_redis
@pytest.mark.parametrize("mode", ["split", "colocated"])
def test_up_generate_down_real_stack(mode, default_model_dir, tmp_path):
    env = {**os.environ, "DUOSERVE_STATE_DIR": str(tmp_path / "state")}
    env.pop("REDIS_URL", None)
    up = cli("up", "--detach", "--mode", mode, "--cache-dir", default_model_dir.parent, "--num-kv-blocks", "128",
             "--startup-timeout", "500", env=env, timeout=600)
    state = stack.read_state(tmp_path / "state" / "default" / stack.STATE_FILE)
    try:
        assert up.returncode == 0, up.stderr
        target = up.stdout.strip()
        assert target == state.gateway_target

        status = cli("status", "--json", env=env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        names = ["redis", "arena", "prefill", "decode", "gateway"] if mode == "split" else \
            ["redis", "colocated", "gateway"]
        assert [(p["name"], p["alive"], p["health"]) for p in report["processes"]] == \
            [(n, True, "SERVING") for n in names]

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
    assert_all_gone(state)
    assert not list(stack.SHM_DIR.glob(f"duoserve-{state.stack_id}-*"))
    assert state.arena_socket is None or not Path(state.arena_socket).exists()
    assert not (tmp_path / "state" / "default" / stack.STATE_FILE).exists()
