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
    return AdminClient(stack.process("orchestrator").target, token or stack.secret)


def _duoctl(stack, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DUOSERVE_ADMIN_TOKEN"}
    cmd = [sys.executable, "-m", "duoserve.duoctl", "--target", stack.process("orchestrator").target, *args]
    if token:
        cmd[3:3] = ["--token", token]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def _shares(stack, token: str | None = None) -> dict[str, float]:
    status = _admin(stack, token).call("GetStatus", pb.GetStatusRequest())
    return {w.phase: w.share for w in status.workers}


def _wait_for_shares(stack, shares: dict[str, float], timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while _shares(stack) != shares and time.monotonic() < deadline:
        time.sleep(0.25)
    return _shares(stack)


def test_a_burst_of_long_prompts_raises_the_prefill_share_then_it_comes_back(split_stack):
    """A burst of long prompts lends prefill decode's core (1.0 / 0.5 on two cores); afterwards, short
    prompts arriving while decode runs give decode its core back. (With nothing queued the policy
    may leave prefill the overlap, ready for a probe arrival at little cost to a running decode
    batch, so "back" is observed under traffic, not as a resting state.)"""
    admin = _admin(split_stack)
    admin.call("PinShares", pb.Shares(prefill=0.5, decode=0.5))          # a known start: earlier tests move them
    assert _wait_for_shares(split_stack, {"prefill": 0.5, "decode": 0.5}, 60) == {"prefill": 0.5, "decode": 0.5}
    admin.call("SetSLO", pb.SLO(ttft_ms=2000, tpot_ms=200, percentile=90, prefer="tpot"))

    def ask(i: int, prompt: str, max_tokens: int) -> None:
        # Each prompt its own from the first block on: prefix caching would otherwise find the burst's
        # shared text cached, and the orchestrator (which sees the cache) rightly plan no prefill for it.
        with duoserve.Client(split_stack.target, timeout=600) as client:
            client.generate(prompt=f"Request {i} of {started_at}: {prompt}", max_tokens=max_tokens, ignore_eos=True)

    started_at = time.time()

    burst = [threading.Thread(target=ask, args=(i, LONG_PROMPT, 8)) for i in range(12)]
    for t in burst:
        t.start()
    time.sleep(0.5)                              # the burst is queued (the pinned shares hold) before auto looks
    started = time.time()
    admin.call("SetPolicy", pb.SetPolicyRequest(mode="auto"))
    for t in burst:
        t.join(timeout=600)
    burst_ended = time.time()
    history = admin.call("GetHistory", pb.GetHistoryRequest(limit=200)).decisions
    moves = [d for d in history if d.changed and started <= d.time_unix <= burst_ended]
    assert any(d.shares.prefill == 1.0 for d in moves), [d.reason for d in moves]
    assert all(d.reason for d in moves)
    # Mixed traffic: a short prompt every half second, each answered at length, so prompts queue while
    # earlier ones decode. A TPOT target that a decode step sharing its core with prefill misses (the
    # policy charges each half the shared core) but one on its own core may meet: decode's own core is
    # then worth more than prefill's second one. (At TPOT 200 ms a fast engine meets it either way,
    # and the policy may rightly keep the overlap.)
    admin.call("SetSLO", pb.SLO(ttft_ms=2000, tpot_ms=60, percentile=90, prefer="tpot"))
    mixed, seen = [], []
    for i in range(6):
        mixed.append(threading.Thread(target=ask, args=(i, "Count to a thousand:", 96)))
        mixed[-1].start()
        for _ in range(5):
            seen.append(_shares(split_stack))
            time.sleep(0.1)
    while any(t.is_alive() for t in mixed):
        seen.append(_shares(split_stack))
        time.sleep(0.1)
    history = admin.call("GetHistory", pb.GetHistoryRequest(limit=200)).decisions
    after = [d for d in history if d.time_unix > burst_ended]
    assert {"prefill": 0.5, "decode": 0.5} in seen or any(d.shares.prefill == 0.5 for d in after), \
        [d.reason for d in after][-10:]


def test_orchestrator_restart_keeps_workers_serving_and_requires_its_token(split_stack):
    admin = _admin(split_stack)
    admin.call("SetSLO", pb.SLO(ttft_ms=3500, tpot_ms=250, percentile=95, prefer="ttft"))
    # duoctl --target sends no secret of its own: the token (or the stack's secret) it must be given.
    _restart(split_stack, "orchestrator", {"DUOSERVE_ADMIN_TOKEN": "t0ken"}, check_serving=False)
    with duoserve.Client(split_stack.target, timeout=120) as client:     # the data plane does not notice
        assert client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                               max_tokens=16, temperature=0).text.count("Paris")
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
    _restart(split_stack, "orchestrator", {"DUOSERVE_ADMIN_TOKEN": None})   # as the other tests expect it


def _restart(stack, name: str, env: dict[str, str | None], check_serving: bool = True) -> None:
    """Kill `name` after changing its environment in the state file (None: the variable removed):
    the stack's supervisor restarts it so."""
    from dataclasses import replace
    from duoserve import stack as stacks
    stack.reload_state()
    old = stack.process(name)
    changed = {**dict(old.env), **env}
    changed = tuple((k, v) for k, v in changed.items() if v is not None)
    procs = tuple(replace(p, env=changed) if p.name == name else p for p in stack.state.processes)
    stacks.write_state(stack.config.state_path, replace(stack.state, processes=procs))
    os.kill(old.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        stack.reload_state()
        if stack.process(name).restarts > old.restarts:
            break
        assert time.monotonic() < deadline, f"the supervisor did not restart {name}"
        time.sleep(0.25)
    while check_serving and _duoctl(stack, "status", token=stack.secret).returncode != 0:
        assert time.monotonic() < deadline, f"{name} did not come back"
        time.sleep(0.5)
