"""The supervisor's restart policy as plain Python: backoff that doubles and resets, stage order, and
what restarts with a restarted arena."""
from __future__ import annotations

import pytest

from duoserve.restart_policy import RestartPolicy, RestartTracker
from duoserve.stack_plan import lost_with, restart_with


def test_backoff_doubles_up_to_the_cap():
    policy = RestartPolicy(base_s=1, max_s=5, stable_s=60)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]
    with pytest.raises(ValueError):
        RestartPolicy(base_s=2, max_s=1)


def test_deaths_in_a_row_back_off_and_a_stable_run_resets():
    tracker = RestartTracker(RestartPolicy(base_s=1, max_s=30, stable_s=60))
    tracker.started("prefill", 2, now=0)
    assert tracker.died("prefill", now=5) == 1
    assert tracker.died("prefill", now=5.5) == 0.5          # still the same death: idempotent
    assert tracker.next_to_restart(now=5.9) == [] and tracker.next_to_restart(now=6) == ["prefill"]
    tracker.restarted("prefill", now=6)
    assert not tracker.is_dead("prefill") and tracker.restarts("prefill") == 1
    assert tracker.died("prefill", now=10) == 2             # died again quickly: twice the wait
    tracker.restarted("prefill", now=12)
    assert tracker.died("prefill", now=200) == 1            # up for longer than stable_s: from the start
    assert tracker.restarts("prefill") == 2 and tracker.restarts("nobody") == 0


def test_lower_stages_come_back_first():
    tracker = RestartTracker(RestartPolicy(base_s=0, max_s=10))
    for name, stage in (("redis", 0), ("arena", 1), ("prefill", 2), ("decode", 2), ("gateway", 3)):
        tracker.started(name, stage, now=0)
    for name in ("gateway", "decode", "arena", "prefill"):
        tracker.died(name, now=1)
    assert tracker.next_to_restart(now=1) == ["arena"]
    tracker.restarted("arena", now=2)
    assert tracker.next_to_restart(now=2) == ["decode", "prefill"]
    tracker.restarted("decode", now=3)
    tracker.restarted("prefill", now=3)
    assert tracker.next_to_restart(now=3) == ["gateway"]
    tracker.restarted("gateway", now=3)
    assert tracker.next_to_restart(now=3) == []


def test_a_due_process_waits_for_a_lower_stage_in_backoff():
    tracker = RestartTracker(RestartPolicy(base_s=1, max_s=30))
    tracker.started("arena", 1, now=0)
    tracker.started("decode", 2, now=0)
    for t in (1, 2, 4):                                     # the arena keeps dying: 1, 2, 4 s
        tracker.died("arena", now=t)
        tracker.restarted("arena", now=t + 0.1)
    tracker.died("arena", now=10)                           # now waits 8 s
    tracker.died("decode", now=10)                          # waits 1 s, then for the arena
    assert tracker.next_to_restart(now=12) == []
    assert tracker.next_to_restart(now=18) == ["arena"]


def test_the_workers_restart_with_the_arena_only_where_its_memory_died():
    assert restart_with("arena", "cpu", memory_kept=True) == ()             # re-opened: the workers go on
    assert restart_with("arena", "cpu", memory_kept=False) == ("prefill", "decode")   # new segments
    assert restart_with("arena", "cuda", memory_kept=True) == ("prefill", "decode")   # IPC handles died
    assert restart_with("prefill", "cpu", memory_kept=False) == restart_with("gateway", "cuda", False) == ()


def test_on_cuda_the_workers_die_with_the_arena_at_once():
    assert lost_with("arena", "cuda") == ("prefill", "decode")      # their IPC memory went with it
    assert lost_with("arena", "cpu") == ()                          # the segments stay mapped until it is back
    assert lost_with("decode", "cuda") == lost_with("redis", "cpu") == ()
