"""services.common.mps: command construction and answer parsing as plain Python, then the daemon's life
(start, find, clients, quit) against tests/common/fake_mps/nvidia-cuda-mps-control, a FAKE of NVIDIA's
binary (the real one cannot run without a GPU). The real daemon is exercised by the gpu-marked stack
test in tests/e2e/test_cuda_stack.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common import mps

FAKE_DIR = Path(__file__).parent / "fake_mps"


# ---------------------------------------------------------------------------------------------- pure

def test_command_text_is_one_line_of_words():
    assert mps.command_text("get_server_list") == "get_server_list\n"
    assert mps.command_text("get_client_list", 4242) == "get_client_list 4242\n"
    assert mps.daemon_argv() == ["nvidia-cuda-mps-control", "-d"]
    with pytest.raises(ValueError):
        mps.command_text("get_client_list", "1 2")       # a smuggled second word
    with pytest.raises(ValueError):
        mps.command_text("quit", "")


def test_parse_pids_reads_one_pid_per_line_and_raises_on_anything_else():
    assert mps.parse_pids("") == []
    assert mps.parse_pids("123\n\n456\n") == [123, 456]
    assert mps.parse_pids("  77  \n") == [77]
    with pytest.raises(mps.MpsError, match="Server not found"):
        mps.parse_pids("Server not found\n", "get_client_list")


def test_client_env_and_percentage_bounds():
    daemon = mps.MpsDaemon("/run/x/mps", "/run/x/log", 10, started_by_us=True)
    assert daemon.client_env(30) == {mps.PIPE_ENV: "/run/x/mps", mps.LOG_ENV: "/run/x/log", mps.PERCENTAGE_ENV: "30"}
    found = mps.MpsDaemon("/tmp/nvidia-mps", "", 10, started_by_us=False)
    assert found.client_env() == {mps.PIPE_ENV: "/tmp/nvidia-mps"}
    for bad in (0, 101, 50.0, -1):
        with pytest.raises(ValueError):
            mps.check_percentage(bad)


def test_control_env_sets_and_clears_the_directories():
    env = mps.control_env("/p", None, base={"PATH": "/bin", mps.LOG_ENV: "/old"})
    assert env == {"PATH": "/bin", mps.PIPE_ENV: "/p"}
    assert mps.control_env("/p", "/l", base={})[mps.LOG_ENV] == "/l"


def test_pid_file_of_a_dead_process_is_no_daemon(tmp_path):
    (tmp_path / mps.PID_FILE).write_text("999999999\n")
    assert mps.read_pid_file(tmp_path) == 999999999
    assert mps.daemon_pid(tmp_path) is None
    (tmp_path / mps.PID_FILE).write_text(f"{os.getpid()}\n")
    assert mps.daemon_pid(tmp_path) == os.getpid()


def test_private_dirs_are_0700_down_from_the_first_missing_parent(tmp_path):
    made = mps.private_dir(tmp_path / "a" / "b" / "mps")
    for p in (tmp_path / "a", tmp_path / "a" / "b", made):
        assert oct(p.stat().st_mode & 0o777) == "0o700"


def test_missing_control_binary_is_a_clear_error(tmp_path):
    with pytest.raises(mps.MpsError, match="not found"):
        mps.query(tmp_path, "get_server_list", binary=str(tmp_path / "no-such-binary"))


# ---------------------------------------------------------------------------------------------- fake daemon

@pytest.fixture
def fake_on_path(monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}")


def _client(daemon: mps.MpsDaemon, percentage: int) -> subprocess.Popen:
    """A process started as the supervisor starts a worker: the daemon's pipe dir in its environment."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, **daemon.client_env(percentage)})


def test_start_find_clients_quit(fake_on_path, tmp_path):
    pipe, log = tmp_path / "pipe", tmp_path / "log"
    daemon = mps.ensure_daemon([tmp_path / "nobody-here"], pipe, log)
    assert daemon.started_by_us and daemon.pid and daemon.pipe_dir == str(pipe)
    assert oct(pipe.stat().st_mode & 0o777) == "0o700" and oct(log.stat().st_mode & 0o777) == "0o700"
    procs = []
    try:
        assert mps.server_list(daemon.pipe_dir) == []            # a server starts with its first client
        procs = [_client(daemon, 30), _client(daemon, 70)]
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        procs.append(bystander)
        clients = mps.wait_for_clients(daemon, [p.pid for p in procs[:2]], timeout_s=10)
        assert {procs[0].pid, procs[1].pid} <= clients and bystander.pid not in clients
        with pytest.raises(mps.MpsError, match=str(bystander.pid)):
            mps.wait_for_clients(daemon, [bystander.pid], timeout_s=0.5)
        assert "command: get_server_list" in (log / "control.log").read_text()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        assert mps.quit_daemon(daemon)
    assert mps.daemon_pid(pipe) is None
    with pytest.raises(mps.MpsError, match="Cannot find MPS control daemon"):
        mps.server_list(pipe)


def test_a_running_daemon_is_used_and_never_quit(fake_on_path, tmp_path):
    theirs = mps.start_daemon(tmp_path / "theirs", tmp_path / "theirs-log")
    try:
        ours = mps.ensure_daemon([tmp_path / "absent", tmp_path / "theirs"], tmp_path / "ours", tmp_path / "ours-log")
        assert not ours.started_by_us and ours.pipe_dir == str(tmp_path / "theirs") and ours.pid == theirs.pid
        assert not mps.quit_daemon(ours)
        time.sleep(0.1)
        assert mps.daemon_pid(tmp_path / "theirs") == theirs.pid
        with pytest.raises(mps.MpsError, match="already serves"):
            mps.start_daemon(tmp_path / "theirs", tmp_path / "x")
    finally:
        assert mps.quit_daemon(theirs)
