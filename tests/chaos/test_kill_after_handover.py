"""A worker killed after a retune by succession (services/worker/succession.py) loses nothing either.

One split stack, detached and supervised, with retunes forced to succession (DUOSERVE_RETUNE_MODE, as
the cuda backend always does) and no orchestrator (only the test sets shares). Each test: requests
in flight, SetComputeShare on one worker, its standby takes the requests over, then `kill -9` of that
standby; every request completes with the tokens of a run without either, every KV block is back.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

import grpc
import pytest
import redis

from duoserve import stack
from duoserve.credentials import bearer, secret_of
from duoserve.stack import Mode, StackConfig
from duoserve.v1 import worker_pb2, worker_pb2_grpc
from services.common.contracts import KeySpace, WorkerReport, from_json
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def handover_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("chaos-handover"), cache_dir=default_model_dir.parent,
                         name="chaos-handover", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300,
                         with_orchestrator=False)
    with pytest.MonkeyPatch.context() as env:     # the workers, their standbys and restarts inherit it
        env.setenv("DUOSERVE_RETUNE_MODE", "succession")
        stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    assert stack.read_state(config.state_path) is None


def _report(config: StackConfig, phase: str) -> WorkerReport:
    state = ops.state(config)
    client = redis.Redis.from_url(state.redis_url)
    try:
        return from_json(WorkerReport, client.hget(KeySpace(state.key_prefix).worker_stats(phase), "m"))
    finally:
        client.close()


def _retune(config: StackConfig, phase: str) -> None:
    """Every core: the worker starts a standby there, which takes over at its first boundary once warm."""
    with grpc.insecure_channel(ops.record(config, phase).target) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).SetComputeShare(
            worker_pb2.SetComputeShareRequest(share=1.0, cpu_ids=sorted(os.sched_getaffinity(0))), timeout=10,
            metadata=bearer(secret_of(ops.state(config).secret_file)))
    assert reply.pending


@pytest.mark.parametrize("victim, prompt_tokens, max_tokens, taken", [
    ("decode", 32, 160, "running requests"),       # the standby takes the requests mid-generation
    pytest.param("prefill", 600, 12, "queue entries",   # the standby takes the queued prompts
                 marks=pytest.mark.chaos_long),
])
def test_a_standby_killed_after_taking_over_loses_nothing(handover_stack, victim, prompt_tokens, max_tokens,
                                                          taken):
    config = handover_stack
    target = ops.state(config).gateway_target
    prompts = ops.prompts(16, prompt_tokens)
    expected = ops.generate_all(target, prompts, max_tokens=max_tokens)
    assert ops.wait_all_free(config, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(config)                   # the kill run computes its prompts cold
    record = ops.record(config, victim)
    old_pid, restarts = _report(config, victim).pid, record.restarts
    log_before = len(open(record.log).read())
    events: list[str] = []

    def retune_then_kill() -> None:
        time.sleep(1.0)                            # every request admitted
        _retune(config, victim)
        deadline = time.monotonic() + 120
        while (pid := _report(config, victim).pid) in (0, old_pid):
            assert time.monotonic() < deadline, f"no standby took over {victim}"
            time.sleep(0.05)
        events.append(open(record.log).read()[log_before:])
        os.kill(pid, signal.SIGKILL)
        events.append(f"killed standby pid {pid}")

    got = ops.generate_all(target, prompts, during=retune_then_kill, max_tokens=max_tokens)
    line = re.findall(r"took over from .*", events[0])
    print(f"{victim}: {line} {events[1:]}", file=sys.stderr)
    assert line and f" 0 {taken}" not in line[-1]        # the standby did take some over
    assert got == expected                                 # one stream each: no token missing or twice
    assert ops.wait_restarted(config, victim, restarts + 1) >= 0
    assert ops.wait_all_free(config, NUM_BLOCKS) == NUM_BLOCKS            # nothing leaked
