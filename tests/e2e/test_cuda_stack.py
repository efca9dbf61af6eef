"""`duoserve up --device cuda`: the plan and the MPS daemon's life with the supervisor (here, against
tests/common/fake_mps, a FAKE of NVIDIA's nvidia-cuda-mps-control: the real one needs a GPU), then the
real thing on a GPU (gpu marker): both workers are MPS clients, greedy output equals the CPU's, and
`down` quits the daemon the stack started."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from duoserve import stack
from duoserve.cli import build_parser, stack_config_from_args
from duoserve.stack import Layout, Mode, StackConfig, StackError
from services.common import mps

FAKE_DIR = Path(__file__).resolve().parents[1] / "common" / "fake_mps"
NAMES = ["redis", "arena", "prefill", "decode", "gateway", "orchestrator"]


def make_config(tmp_path: Path, **overrides) -> StackConfig:
    return StackConfig(**{"state_dir": tmp_path / "state", "cache_dir": tmp_path / "models", "device": "cuda",
                          "startup_timeout_s": 30.0, "stop_timeout_s": 3.0, **overrides})


def test_cuda_plan_runs_arena_and_workers_on_cuda_as_mps_clients_with_their_percentages(tmp_path):
    config = make_config(tmp_path, prefill_percentage=70, decode_percentage=30)
    daemon = mps.MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log"), 4242, started_by_us=True)
    layout = replace(Layout.new(config.stack_dir), mps=daemon)
    by_name = {p.name: p for s in stack.plan(config, layout, {n: (1000 + i, 2000 + i) for i, n in enumerate(NAMES)})
               for p in s}
    for name in ("arena", "prefill", "decode"):
        assert "--device cuda" in " ".join(by_name[name].argv)
        assert dict(by_name[name].env)[mps.PIPE_ENV] == str(tmp_path / "pipe")
    assert mps.PERCENTAGE_ENV not in dict(by_name["arena"].env)              # no compute, no cap
    assert dict(by_name["prefill"].env)[mps.PERCENTAGE_ENV] == "70"
    assert dict(by_name["decode"].env)[mps.PERCENTAGE_ENV] == "30"
    for name in ("gateway", "orchestrator", "redis"):
        assert mps.PIPE_ENV not in dict(by_name[name].env)              # no CUDA context: no MPS client
    assert "--device" not in by_name["gateway"].argv and "--device" not in by_name["redis"].argv
    assert "--device cuda" in " ".join(by_name["orchestrator"].argv)     # its shares are SMs
    cpu = {p.name: p for s in stack.plan(make_config(tmp_path, device="cpu"), Layout.new(config.stack_dir),
                                         {n: (1000 + i, 2000 + i) for i, n in enumerate(NAMES)}) for p in s}
    assert all("--device" not in p.argv and mps.PIPE_ENV not in dict(p.env) for p in cpu.values())


def test_green_retune_plan_runs_the_workers_uncapped_by_mps_with_green_partitions(tmp_path):
    config = make_config(tmp_path, prefill_percentage=70, decode_percentage=30, cuda_retune_mode="green")
    daemon = mps.MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log"), 4242, started_by_us=True)
    layout = replace(Layout.new(config.stack_dir), mps=daemon)
    by_name = {p.name: p for s in stack.plan(config, layout, {n: (1000 + i, 2000 + i) for i, n in enumerate(NAMES)})
               for p in s}
    for name in ("prefill", "decode"):
        assert "--retune-mode green" in " ".join(by_name[name].argv)
        assert dict(by_name[name].env)[mps.PERCENTAGE_ENV] == "100"      # the green partition is the cap
    with pytest.raises(ValueError):
        make_config(tmp_path, cuda_retune_mode="fast")
    args = build_parser().parse_args(["up", "--device", "cuda", "--retune-mode", "green", "--state-dir", str(tmp_path)])
    assert stack_config_from_args(args).cuda_retune_mode == "green"


def test_config_and_cli_take_the_device_and_percentages(tmp_path):
    assert make_config(tmp_path).uses_mps and not make_config(tmp_path, mode=Mode.COLOCATED).uses_mps
    assert not make_config(tmp_path, device="cpu").uses_mps
    with pytest.raises(ValueError):
        make_config(tmp_path, prefill_percentage=0)
    with pytest.raises(ValueError):
        make_config(tmp_path, device="tpu")
    args = build_parser().parse_args(["up", "--device", "cuda", "--prefill-percentage", "60", "--decode-percentage",
                                      "40", "--mps-pipe-dir", "/run/mps", "--state-dir", str(tmp_path)])
    config = stack_config_from_args(args)
    assert (config.device, config.prefill_percentage, config.decode_percentage, config.mps_pipe_dir) == \
        ("cuda", 60, 40, Path("/run/mps"))


# ---------------------------------------------------------------------------------------------- fake daemon

@pytest.fixture
def fake_on_path(monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}")


def _launcher(config: StackConfig) -> stack._Launcher:
    import threading
    stack.make_stack_dir(config.stack_dir)
    launcher = stack._Launcher(config, Layout.new(config.stack_dir), lambda m: None, threading.Event(),
                               supervised=False)
    launcher.logs.mkdir(parents=True, exist_ok=True)
    return launcher


def test_supervisor_starts_a_private_daemon_records_it_and_down_quits_it(fake_on_path, tmp_path):
    config = make_config(tmp_path, mps_pipe_dir=tmp_path / "operator-has-none")
    launcher = _launcher(config)
    launcher._start_mps()
    state = stack.read_state(config.state_path)
    daemon = mps.MpsDaemon(**state.mps)
    assert daemon.started_by_us and Path(daemon.pipe_dir) == launcher.layout.private_mps_pipe_dir()
    assert oct(Path(daemon.pipe_dir).stat().st_mode & 0o777) == "0o700"
    assert mps.daemon_pid(daemon.pipe_dir) == daemon.pid
    # A worker started from the plan is a client (the fake counts the pipe dir in its environment).
    spec = stack.process_spec("decode", config, launcher.layout, {n: (1, 2) for n in NAMES})
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, **dict(spec.env)})
    try:
        launcher.records = [stack.ProcessRecord("decode", worker.pid, None, 2, 1, 2, "grpc", "/x", ())]
        launcher._check_mps_clients(("decode",))
    finally:
        worker.kill()
        worker.wait()
    said: list[str] = []
    stack.teardown(state, config.state_path, 3.0, said.append)
    assert mps.daemon_pid(daemon.pipe_dir) is None and not Path(daemon.pipe_dir).exists()
    assert any("quit" in s for s in said) and not config.state_path.exists()


def test_supervisor_uses_the_operators_daemon_and_leaves_it_running(fake_on_path, tmp_path):
    theirs = mps.start_daemon(tmp_path / "theirs", tmp_path / "theirs-log")
    try:
        config = make_config(tmp_path, mps_pipe_dir=tmp_path / "theirs")
        launcher = _launcher(config)
        launcher._start_mps()
        state = stack.read_state(config.state_path)
        assert state.mps == {"pipe_dir": str(tmp_path / "theirs"), "log_dir": "", "pid": theirs.pid,
                             "started_by_us": False}
        with pytest.raises(StackError, match="did not attach to MPS"):      # a worker that is no client
            launcher.records = [stack.ProcessRecord("prefill", os.getpid(), None, 2, 1, 2, "grpc", "/x", ())]
            launcher._check_mps_clients(("prefill",), timeout_s=0.3)
        stack.teardown(state, config.state_path, 3.0, lambda m: None)
        assert mps.daemon_pid(tmp_path / "theirs") == theirs.pid
    finally:
        mps.quit_daemon(theirs)


def test_no_mps_binary_refuses_the_start_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    launcher = _launcher(make_config(tmp_path, mps_pipe_dir=tmp_path / "none"))
    with pytest.raises(StackError, match="nvidia-cuda-mps-control not found"):
        launcher._start_mps()


# ---------------------------------------------------------------------------------------------- gpu

@pytest.mark.gpu
@pytest.mark.slow
def test_up_on_cuda_workers_are_mps_clients_greedy_matches_cpu_and_down_quits_the_daemon(tmp_path,
                                                                                          default_model_dir):
    if shutil.which(mps.CONTROL_BINARY) is None:
        pytest.skip("nvidia-cuda-mps-control not on PATH")
    from bench.gpu_check import PROMPTS, cpu_greedy, stack_greedy
    config = StackConfig(state_dir=tmp_path / "state", cache_dir=default_model_dir.parent, name="gpu",
                         model=str(default_model_dir), device="cuda", prefill_percentage=60, decode_percentage=40,
                         num_kv_blocks=512, with_orchestrator=False, startup_timeout_s=300)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    state = stack.read_state(config.state_path)
    daemon = mps.MpsDaemon(**state.mps)
    try:
        pids = {r.name: r.pid for r in state.processes}
        clients = mps.all_clients(daemon.pipe_dir)
        assert {pids["prefill"], pids["decode"]} <= clients
        environ = Path(f"/proc/{pids['decode']}/environ").read_bytes().split(b"\0")
        assert f"{mps.PERCENTAGE_ENV}=40".encode() in environ
        got = stack_greedy(state.gateway_target, PROMPTS, 16)
    finally:
        stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    assert got == cpu_greedy(str(default_model_dir), default_model_dir.parent, PROMPTS, 16)
    if daemon.started_by_us:
        assert mps.daemon_pid(daemon.pipe_dir) is None
    else:
        assert mps.daemon_pid(daemon.pipe_dir) == daemon.pid
