"""The orchestrator on a real stack: a burst moves the shares and they come back; the Admin API's
token; an orchestrator restart leaves the workers serving and resumes its settings."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import duoserve
from duoserve.v1 import admin_pb2 as pb

pytestmark = pytest.mark.slow

LONG_PROMPT = "Summarize: " + "the quick brown fox jumps over the lazy dog " * 40   # ~370 tokens


def _admin(stack, token: str | None = None):
    from duoserve.duoctl import AdminClient
    return AdminClient(stack.process("orchestrator").target, token)


def _duoctl(stack, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DUOSERVE_ADMIN_TOKEN"}
    cmd = [sys.executable, "-m", "duoserve.duoctl", "--target", stack.process("orchestrator").target, *args]
    if token:
        cmd[3:3] = ["--token", token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def _shares(stack, token: str | None = None) -> dict[str, float]:
    status = _admin(stack, token).call("GetStatus", pb.GetStatusRequest())
    return {w.phase: w.share for w in status.workers}


def test_a_burst_of_long_prompts_raises_the_prefill_share_then_it_comes_back(split_stack):
    admin = _admin(split_stack)
    admin.call("SetPolicy", pb.SetPolicyRequest(mode="auto"))
    admin.call("SetSLO", pb.SLO(ttft_ms=2000, tpot_ms=200, percentile=90, prefer="tpot"))
    deadline = time.monotonic() + 60
    while _shares(split_stack) != {"prefill": 0.5, "decode": 0.5} and time.monotonic() < deadline:
        time.sleep(0.5)                                                  # earlier tests may have moved them
    assert _shares(split_stack) == {"prefill": 0.5, "decode": 0.5}
    started = time.time()

    def ask(i: int) -> None:
        with duoserve.Client(split_stack.target, timeout=600) as client:
            client.generate(prompt=LONG_PROMPT + str(i), max_tokens=8, ignore_eos=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    history = admin.call("GetHistory", pb.GetHistoryRequest(limit=200)).decisions
    moves = [d for d in history if d.changed and d.time_unix >= started]
    assert any(d.shares.prefill == 1.0 for d in moves), [d.reason for d in moves]
    assert all(d.reason for d in moves)
    deadline = time.monotonic() + 60
    while _shares(split_stack) != {"prefill": 0.5, "decode": 0.5} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _shares(split_stack) == {"prefill": 0.5, "decode": 0.5}     # back after the burst


def test_orchestrator_restart_keeps_workers_serving_and_requires_its_token(split_stack):
    from tests.e2e.test_requests import _adopt
    admin = _admin(split_stack)
    admin.call("SetSLO", pb.SLO(ttft_ms=3500, tpot_ms=250, percentile=95, prefer="ttft"))
    record = split_stack.process("orchestrator")
    os.kill(record.pid, signal.SIGKILL)
    with duoserve.Client(split_stack.target, timeout=120) as client:     # the data plane does not notice
        assert client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                               max_tokens=16, temperature=0).text.count("Paris")
    env = {**os.environ, "DUOSERVE_ADMIN_TOKEN": "t0ken"}
    with open(record.log, "ab") as log:
        proc = subprocess.Popen(list(record.argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    _adopt(split_stack, record, proc.pid)
    deadline = time.monotonic() + 60
    while True:
        refused = _duoctl(split_stack, "status", "--json")
        if "UNAUTHENTICATED" in refused.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    status = json.loads(_duoctl(split_stack, "status", "--json", token="t0ken").stdout)
    assert {w["phase"]: w["share"] for w in status["workers"]} == {"prefill": 0.5, "decode": 0.5}
    assert all(w["units_kind"] == "core" and 0 < w["measured_units"] <= w["units_total"]     # the SMs/cores column
               for w in status["workers"]), status["workers"]
    assert status["slo"]["ttft_ms"] == 3500 and status["slo"]["prefer"] == "ttft"      # reloaded from Redis
    assert {p["phase"] for p in status["model_fit"]["phases"]} >= {"prefill", "decode"}
    history = _duoctl(split_stack, "history", token="t0ken")
    assert history.returncode == 0
    _restart(split_stack, record, env=dict(os.environ))      # leave the stack as the other tests expect it


def _restart(stack, record, env: dict[str, str]) -> None:
    from tests.e2e.test_requests import _adopt
    os.kill(stack.process(record.name).pid, signal.SIGTERM)
    with open(record.log, "ab") as log:
        proc = subprocess.Popen(list(record.argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    _adopt(stack, record, proc.pid)
    deadline = time.monotonic() + 60
    while _duoctl(stack, "status").returncode != 0:
        assert time.monotonic() < deadline, "the orchestrator did not come back"
        time.sleep(0.5)
