"""Retune by handover, the parts checked without a stack (the whole path: tests/e2e/test_handover.py):
the successor's command line, the WorkerHandover message, the supervisor following successors in a
real Redis, and the orchestrator adopting the measured switch cost."""
from __future__ import annotations

import subprocess
import sys
import time

from duoserve import stack
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import Controller
from orchestrator.perf_model import LLAMA3_8B, PerfModel, h100
from orchestrator.policy import Policy, PolicyConfig
from orchestrator.redis_state import RedisState
from services.common.contracts import Handoff, WorkerHandover, WorkerReport, from_json, to_json
from services.engine.sampling_params import SamplingParams
from services.worker.config import Phase
from services.worker.control import ShareState
from services.worker.handover import Retuner, mps_percentage, successor_argv


def test_successor_argv_replaces_cores_and_takeover_only():
    argv = ("--redis-url", "redis://x", "--port", "5", "--cpus", "0", "--takeover-from", "decode-1-a", "--dtype=f")
    got = successor_argv(Phase.DECODE, argv, (0, 1), "decode-2-b")
    assert got[:3] == [sys.executable, "-m", "services.decode.main"]
    assert got[3:] == ["--redis-url", "redis://x", "--port", "5", "--dtype=f", "--cpus", "0,1",
                       "--takeover-from", "decode-2-b"]
    cuda = successor_argv(Phase.PREFILL, ("--cpus=3", "--device", "cuda"), (), "prefill-1-a")
    assert cuda[3:] == ["--cpus=3", "--device", "cuda", "--takeover-from", "prefill-1-a"]   # host cores kept
    assert [mps_percentage(s) for s in (0.0, 0.004, 0.5, 0.704, 1.2)] == [1, 1, 50, 70, 100]


def test_a_share_requested_while_a_standby_starts_starts_no_second_one(caplog):
    """The race the e2e handover test once hit: two standbys for one retune, each waiting to take over."""
    standby = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        retuner = Retuner(worker=None, stack_cpus=(0, 1), release_ports=lambda: None,
                          share=ShareState(1.0, (0, 1), 0), standby=standby)
        retuner.begin(ShareState(1.0, (0, 1), 0))          # worker=None: starting one would fail
        assert retuner.standby is standby and retuner.pending
        assert "requested during the handover to 1.00" in caplog.text
    finally:
        standby.kill()
        standby.wait()


def test_worker_handover_round_trips_with_its_hand_offs():
    handoff = Handoff("r1", (3, 4), (1, 2, 3), (9,), 3, SamplingParams(max_tokens=5, stop=("x",)), "reply:g", 1.0, 2.0)
    message = WorkerHandover("decode-1-a", 0.5, (1,), 0, 10.0, 11.0, (handoff,), ("1-0",))
    assert from_json(WorkerHandover, to_json(message)) == message


def _state(redis_url: str, prefix: str, pid: int, start: int | None) -> stack.StackState:
    record = stack.ProcessRecord("decode", pid, start, 2, 1, 0, "grpc", "/dev/null", ())
    return stack.StackState("s", "split", "id", prefix, "duoserve-id-", redis_url, True, None, None, None, None,
                            0.0, processes=(record,))


def test_supervisor_follows_a_chain_of_successors(redis_server, redis_client, keys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    successor = subprocess.Popen(["sleep", "30"])
    try:
        start = stack.process_start_time(successor.pid)
        redis_client.hset(keys.successors, mapping={"111": f"{gone.pid}:1", str(gone.pid): f"{successor.pid}:{start}"})
        followed = stack.follow_handovers(_state(redis_server.url, keys.prefix, 111, 5))
        assert [(r.name, r.pid, r.start_time) for r in followed.processes] == [("decode", successor.pid, start)]
        redis_client.hset(keys.successors, str(gone.pid), f"{successor.pid}:{start + 1}")   # a recycled pid
        followed = stack.follow_handovers(_state(redis_server.url, keys.prefix, 111, 5))
        assert [r.pid for r in followed.processes] == [successor.pid] and not stack.stack_status(followed)[0].alive
        unreachable = stack.follow_handovers(_state("redis://127.0.0.1:1/0", keys.prefix, 111, 5))
        assert [r.pid for r in unreachable.processes] == [111]          # no Redis: the state file as it is
    finally:
        successor.kill()
        successor.wait()


def test_the_measured_pause_becomes_the_policys_switch_cost(redis_client, keys):
    config = OrchestratorConfig(redis_url="", key_prefix=keys.prefix, port=1, stack_cpus=(0, 1))
    controller = Controller(config, RedisState(redis_client, keys),
                            Policy(PerfModel(h100(), LLAMA3_8B), PolicyConfig(switch_cost_ms=1.0)))
    for phase, stall in (("prefill", 40.0), ("decode", 0.0)):
        report = WorkerReport(phase, f"{phase}-1", "127.0.0.1:1", 0.5, (), 0, 0, 0, 0, 0, 0, time.time(),
                              share_switch_ms=9000.0 if stall else 0.0, share_switch_stall_ms=stall)
        redis_client.hset(keys.worker_stats(phase), mapping={"m": to_json(report)})
    controller.tick()
    assert controller.policy.config.switch_cost_ms == 9000.0     # the standby's start-up and the pause
    assert controller.policy.config.switch_pause_ms == 40.0      # of it, the pause delays a move's replay
    assert controller.policy.config.hold.dwell_ms(9000.0) == 36_000.0    # a change lasts 4x what it costs
