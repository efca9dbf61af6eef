"""`python -m duoserve.reaper`, a worker container's main process, with real processes.

The command stands in for a worker that leaves a successor behind: it starts one in its own process
group and exits (a reaper's own standbys, started for a retune by succession: tests/common/test_succession.py).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# argv[1]: where the successor writes its pid; argv[2]: its exit status; argv[3]: seconds it lives.
HANDS_OVER = textwrap.dedent("""
    import subprocess, sys
    successor = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
                 "time.sleep(float(sys.argv[3])); sys.exit(int(sys.argv[2]))")
    subprocess.Popen([sys.executable, "-c", successor, *sys.argv[1:]])
    sys.exit(0)                      # the old worker leaves; the successor serves on
""")


def reaper(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "duoserve.reaper", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_pid(path: Path, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"no pid in {path}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_stays_until_the_successor_ends_and_exits_with_its_status(tmp_path: Path) -> None:
    pid_file = tmp_path / "successor.pid"
    proc = reaper(sys.executable, "-c", HANDS_OVER, str(pid_file), "3", "1.5")
    successor = wait_for_pid(pid_file)
    assert proc.poll() is None and alive(successor)          # the first command is gone; we wait on
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err                         # the last process to end decides
    assert not alive(successor)


def test_sigterm_reaches_the_successor_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "successor.pid"
    proc = reaper(sys.executable, "-c", HANDS_OVER, str(pid_file), "0", "120")
    successor = wait_for_pid(pid_file)
    time.sleep(0.2)                                          # the first command has exited by now
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)                         # `docker stop`
    proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 128 + signal.SIGTERM
    assert not alive(successor)


def test_passes_the_command_status_through() -> None:
    proc = reaper("--", sys.executable, "-c", "import sys; sys.exit(7)")
    proc.communicate(timeout=60)
    assert proc.returncode == 7
