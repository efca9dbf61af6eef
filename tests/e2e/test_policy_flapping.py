"""The policy does not flap on a real split stack while other processes load its cores (issue 14).

Measured before the fix (2026-12-02): a stack with at most one request in flight beside another
stack on the same two cores made 29 share changes in 4.5 minutes. Here the other tenant is a CPU
burner per core that spins and sleeps in random bursts (the noise a shared machine makes); the
targets: no change over a minute of idle, at most 2 a minute under light steady traffic.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import duoserve
from duoserve.v1 import admin_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.long]   # two 60 s windows (~2.5 minutes): `make chaos` runs it, `make test` does not

# Spins for 50 to 400 ms, sleeps for 50 to 400 ms, forever: a neighbour whose load comes and goes.
BURNER = """
import random, time
rng = random.Random({seed})
while True:
    end = time.perf_counter() + rng.uniform(0.05, 0.4)
    while time.perf_counter() < end:
        pass
    time.sleep(rng.uniform(0.05, 0.4))
"""


class Burners:
    """One burner subprocess per core of the machine, stopped (by pid) on exit."""

    def __enter__(self) -> "Burners":
        self.procs = [subprocess.Popen([sys.executable, "-c", BURNER.format(seed=i)])
                      for i in range(len(os.sched_getaffinity(0)))]
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)


def _admin(stack):
    from duoserve.duoctl import AdminClient
    return AdminClient(stack.process("orchestrator").target, stack.secret)


def _changes(admin, since: float) -> tuple[int, int, list[str]]:
    """(share changes, token-budget-only changes, their reasons) recorded after `since`."""
    history = admin.call("GetHistory", pb.GetHistoryRequest(limit=1000)).decisions
    shares = budgets = 0
    reasons = []
    previous = None
    for d in sorted(history, key=lambda d: d.time_unix):
        if d.changed and d.time_unix > since:
            moved = previous is None or (d.shares.prefill, d.shares.decode) != previous
            shares += moved
            budgets += not moved
            reasons.append(d.reason)
        previous = (d.shares.prefill, d.shares.decode)
    return shares, budgets, reasons


def _auto_at_default_slo(stack) -> None:
    admin = _admin(stack)
    admin.call("SetSLO", pb.SLO(ttft_ms=2000, tpot_ms=200, percentile=90, prefer="tpot"))
    admin.call("SetPolicy", pb.SetPolicyRequest(mode="auto"))


def _short_request(stack, i: int) -> None:
    with duoserve.Client(stack.target, timeout=120) as client:
        client.generate(prompt=f"Say hello to number {i}.", max_tokens=12, ignore_eos=True)


def test_an_idle_stack_makes_no_share_change_while_its_cores_are_loaded(split_stack):
    _auto_at_default_slo(split_stack)
    for i in range(3):                                   # warm-up: the model has samples, the queue drains
        _short_request(split_stack, i)
    with Burners():
        time.sleep(5)                                    # the shares settle after the warm-up traffic
        started = time.time()
        time.sleep(60)
        shares, budgets, reasons = _changes(_admin(split_stack), started)
    print(f"idle 60 s beside burners: {shares} share changes, {budgets} budget changes")
    assert shares == 0 and budgets == 0, reasons


def test_light_steady_traffic_makes_at_most_two_share_changes_a_minute(split_stack):
    _auto_at_default_slo(split_stack)
    _short_request(split_stack, 0)
    stop = threading.Event()

    def one_at_a_time() -> None:
        i = 1
        while not stop.is_set():
            _short_request(split_stack, i)
            i += 1
            stop.wait(0.5)

    with Burners():
        time.sleep(2)
        started = time.time()
        client = threading.Thread(target=one_at_a_time)
        client.start()
        time.sleep(60)
        stop.set()
        client.join(timeout=120)
        shares, budgets, reasons = _changes(_admin(split_stack), started)
    print(f"light traffic 60 s beside burners: {shares} share changes, {budgets} budget changes")
    print("\n".join(reasons))
    assert shares <= 2, reasons
