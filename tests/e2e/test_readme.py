"""The README's Use section, run as written: its shell lines in order (a real `duoserve up`, the
gateway over gRPC and HTTP, duoctl, `duoserve down`) and its first Python block against that stack,
so the quickstart cannot drift from the code. Only what a clone cannot share with a running machine
changes: the ports (free ones instead of 50051/8000, in case something holds those), the state
directory and the model cache (the session's converted model)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from duoserve.stack_procs import pick_free_ports

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def use_section() -> str:
    text = README.read_text()
    return text[text.index("## Use\n"):].split("\n## ", 1)[0]


def first_block(section: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block in the README's Use section"
    return match.group(1)


def shell_lines(block: str) -> list[str]:
    """Commands, continuation lines joined; `make install` is what the suite's own setup already did."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [ln.strip() for ln in joined.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith("make install")]


def test_the_readme_use_section_runs_as_written(default_model_dir, tmp_path):
    grpc_port, http_port = pick_free_ports(2)
    ports = lambda text: text.replace("50051", str(grpc_port)).replace("8000", str(http_port))   # noqa: E731
    env = {**os.environ, "DUOSERVE_STATE_DIR": str(tmp_path / "state"),
           "DUOSERVE_CACHE_DIR": str(default_model_dir.parent),
           "DUOSERVE_PORT": str(grpc_port), "DUOSERVE_HTTP_PORT": str(http_port),   # `duoserve up`'s defaults
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for var in ("REDIS_URL", "DUOSERVE_STACK", "DUOCTL_TARGET"):
        env.pop(var, None)
    section = use_section()
    lines = [ports(ln) for ln in shell_lines(first_block(section, "bash"))]
    python_block = ports(first_block(section, "python"))
    down = lines.index("duoserve down")
    outputs: dict[str, str] = {}

    def run(command: list[str], what: str, timeout: float) -> str:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        assert done.returncode == 0, f"{what!r} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        outputs[what] = done.stdout
        return done.stdout

    try:
        for line in lines[:down]:
            run(["bash", "-c", line], line, timeout=600)
        run([sys.executable, "-c", python_block], "python", timeout=300)
    finally:
        subprocess.run(["bash", "-c", "duoserve down"], env=env, capture_output=True, timeout=120)
    for line in lines[down + 1:]:
        run(["bash", "-c", line], line, timeout=300)

    remote = next(out for cmd, out in outputs.items() if cmd.startswith("duoserve generate --target"))
    assert "Paris" in remote
    assert "Paris" in next(out for cmd, out in outputs.items() if cmd.startswith("curl -s localhost"))
    assert "data: [DONE]" in next(out for cmd, out in outputs.items() if cmd.startswith("curl -sN"))
    assert "Paris" in outputs["python"].splitlines()[0]          # the block's first print, as its comment says
    assert "Paris" in next(out for cmd, out in outputs.items() if cmd.startswith("duoserve generate --max"))
