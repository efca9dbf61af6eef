"""Retune by succession, the parts checked without a stack (the whole path: tests/e2e/test_handover.py):
the standby's command line, the SuccessionState contract, a share requested during a succession
(queued, never dropped: the latest wins), SetComputeShare's reply, the supervisor starting a standby
and following successors in a real Redis, the orchestrator acting on the reply, and the orchestrator
adopting the measured switch cost."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from duoserve import stack
from duoserve.standbys import Standbys
from duoserve.v1 import worker_pb2
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import Controller
from orchestrator.perf_model import LLAMA3_8B, PerfModel, h100
from orchestrator.policy import Policy, PolicyConfig, Shares
from orchestrator.redis_state import RedisState
from services.common import succession as wire
from services.common.contracts import Handoff, RequestedShare, SuccessionState, WorkerReport, from_json, to_json
from services.engine.sampling_params import SamplingParams
from services.worker.config import Phase, WorkerConfig, parse_args
from services.worker.control import ShareState, ShareStatus, WorkerControl
from services.worker.servicer import WorkerServicer
from services.worker.succession import mps_percentage, needs_successor


def test_standby_argv_replaces_cores_and_takeover_only():
    argv = ("py", "-m", "services.decode.main", "--port", "5", "--cpus", "0", "--takeover-from", "decode-1-a",
            "--dtype=f")
    assert wire.standby_argv(argv, (0, 1), "decode-2-b") == (
        "py", "-m", "services.decode.main", "--port", "5", "--dtype=f", "--cpus", "0,1", "--takeover-from", "decode-2-b")
    cuda = wire.standby_argv(("py", "--cpus=3", "--device", "cuda"), (), "prefill-1-a")
    assert cuda == ("py", "--cpus=3", "--device", "cuda", "--takeover-from", "prefill-1-a")   # host cores kept
    assert wire.without_flags(cuda, (wire.TAKEOVER_FLAG,)) == ("py", "--cpus=3", "--device", "cuda")
    env = (("A", "1"), (wire.PERCENTAGE_ENV, "50"))
    assert wire.standby_env(env, 70) == (("A", "1"), (wire.PERCENTAGE_ENV, "70"))
    assert wire.standby_env(env, 0) == env
    assert [mps_percentage(s) for s in (0.0, 0.004, 0.5, 0.704, 1.2)] == [1, 1, 50, 71, 100]   # a cap covering the share


def test_succession_state_round_trips_with_its_hand_offs_and_queued_share():
    handoff = Handoff("r1", (3, 4), (1, 2, 3), (9,), 3, SamplingParams(max_tokens=5, stop=("x",)), "reply:g", 1.0, 2.0)
    state = SuccessionState("decode-1-a", 0.5, (1,), 0, 10.0, 11.0, (handoff,), ("1-0",),
                            queued=RequestedShare(1.0, (0, 1), 64, 10.5))
    assert from_json(SuccessionState, to_json(state)) == state
    bare = SuccessionState("prefill-1-a", 1.0, (0, 1), 2048, 10.0, 11.0)
    assert from_json(SuccessionState, to_json(bare)) == bare and bare.queued is None


def _config(retune_mode: str = "succession", device: str = "cpu") -> WorkerConfig:
    return WorkerConfig(phase=Phase.DECODE, redis_url="redis://x", key_prefix="t", port=1, metrics_port=0,
                        arena_socket=Path("/nonexistent"), model=None, cache_dir=Path("/nonexistent"),
                        retune_mode=retune_mode, device=device)


def test_which_shares_need_a_successor():
    current = ShareState(0.5, (1,), 0)
    assert needs_successor(_config(), current, ShareState(1.0, (0, 1), 0))
    assert not needs_successor(_config(), current, ShareState(0.5, (1,), 64))        # a budget alone: in place
    assert not needs_successor(_config("inplace"), current, ShareState(1.0, (0, 1), 0))
    assert needs_successor(_config(device="cuda"), ShareState(0.5, (), 0), ShareState(0.7, (), 0))
    assert not needs_successor(_config(device="cuda"), ShareState(0.5, (), 0), ShareState(0.4995, (), 0))   # the same 50% cap
    assert parse_args(Phase.DECODE, ["--port", "1", "--redis-url", "redis://x", "--arena-socket", "/s",
                                     "--retune-mode", "handover"]).retune_mode == "succession"   # its old name


def test_a_share_requested_during_a_succession_is_queued_and_the_latest_wins():
    control = WorkerControl(ShareState(0.5, (1,), 0))
    always = lambda current, new: True  # noqa: E731
    target, status = control.request_share(ShareState(1.0, (0, 1), 0), always)
    assert status is ShareStatus.RETUNING and control.wanted[1] is ShareStatus.RETUNING
    assert control.take_requested_share() == target
    control.succession_started(target)
    assert control.wanted[:2] == (target, ShareStatus.RETUNING) and control.share.cpu_ids == (1,)
    _, status = control.request_share(ShareState(0.5, (1,), 0), always)
    assert status is ShareStatus.QUEUED
    latest, status = control.request_share(ShareState(0.5, (0,), 0), always)      # replaces the first
    assert status is ShareStatus.QUEUED and control.wanted[:2] == (latest, ShareStatus.QUEUED)
    assert control.take_requested_share() is None                                  # not during the succession
    assert control.take_queued_share() == latest                                   # handed to the successor
    assert control.take_queued_share() is None

    successor = WorkerControl(ShareState(0.5, (1,), 0))            # the successor takes it at its first boundary
    before = successor.wanted[2]
    successor.carry_over(latest)
    assert successor.wanted[1] is ShareStatus.ACCEPTED and successor.wanted[2] >= before
    assert successor.take_requested_share() == latest


def test_a_failed_succession_leaves_the_queued_share_to_this_worker():
    control = WorkerControl(ShareState(0.5, (1,), 0))
    target, _ = control.request_share(ShareState(1.0, (0, 1), 0), lambda c, n: True)
    control.take_requested_share()
    control.succession_started(target)
    queued, _ = control.request_share(ShareState(0.5, (0,), 0), lambda c, n: True)
    changed = control.wanted[2]
    control.succession_failed()
    assert control.share.cpu_ids == (1,) and control.wanted[2] >= changed
    assert control.take_requested_share() == queued                               # never dropped


class _Context:
    def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


def test_set_compute_share_replies_what_the_worker_does_with_it():
    control = WorkerControl(ShareState(0.5, (1,), 0))
    servicer = WorkerServicer(_config(), control, (0, 1))
    reply = servicer.SetComputeShare(worker_pb2.SetComputeShareRequest(share=1.0, cpu_ids=[0, 1]), _Context())
    assert reply.status == worker_pb2.SHARE_STATUS_RETUNING and reply.pending and reply.changed_at_unix_ms > 0
    control.succession_started(control.take_requested_share())
    reply = servicer.SetComputeShare(worker_pb2.SetComputeShareRequest(share=0.5, cpu_ids=[1]), _Context())
    assert reply.status == worker_pb2.SHARE_STATUS_QUEUED and list(reply.cpu_ids) == [1]
    stats = servicer.GetStats(worker_pb2.GetStatsRequest(), _Context())
    assert stats.share.status == worker_pb2.SHARE_STATUS_QUEUED and stats.share.pending
    inplace = WorkerServicer(_config("inplace"), WorkerControl(ShareState(0.5, (1,), 0)), (0, 1))
    reply = inplace.SetComputeShare(worker_pb2.SetComputeShareRequest(share=1.0, cpu_ids=[0, 1]), _Context())
    assert reply.status == worker_pb2.SHARE_STATUS_ACCEPTED


def _controller(redis_client, keys) -> Controller:
    config = OrchestratorConfig(redis_url="", key_prefix=keys.prefix, port=1, stack_cpus=(0, 1))
    return Controller(config, RedisState(redis_client, keys),
                      Policy(PerfModel(h100(), LLAMA3_8B), PolicyConfig(switch_cost_ms=1.0)))


def _write_report(redis_client, keys, phase: str, share: float, changed_at: float, pending: bool = False,
                  budget: int = 0, **extra) -> None:
    report = WorkerReport(phase, f"{phase}-1", "127.0.0.1:1", share, (), budget, 0, 0, 0, 0, 0, time.time(),
                          share_pending=pending, share_changed_at=changed_at, **extra)
    redis_client.hset(keys.worker_stats(phase), mapping={"m": to_json(report)})


def test_the_orchestrator_acts_on_the_reply_until_the_report_reflects_it(redis_client, keys):
    controller = _controller(redis_client, keys)
    for phase in ("prefill", "decode"):
        _write_report(redis_client, keys, phase, 0.5, changed_at=100.0, budget=64)
    reply = worker_pb2.ComputeShare(share=1.0, token_budget=64, status=worker_pb2.SHARE_STATUS_QUEUED,
                                    changed_at_unix_ms=200_000, pending=True)
    controller._accept("decode", reply, None)
    snap = controller.state.snapshot()
    assert controller._current_shares(snap) == Shares(0.5, 1.0, 64)      # the report predates the reply
    _write_report(redis_client, keys, "decode", 1.0, changed_at=200.0, pending=True)   # reflects it (queued)
    assert controller._current_shares(controller.state.snapshot()) == Shares(0.5, 1.0, 64)
    assert "decode" not in controller.accepted
    controller._accept("decode", reply, None)
    _write_report(redis_client, keys, "decode", 0.5, changed_at=250.0)     # the succession failed: the old share
    assert controller._current_shares(controller.state.snapshot()) == Shares(0.5, 0.5, 64)


def test_the_measured_pause_becomes_the_policys_switch_cost(redis_client, keys):
    controller = _controller(redis_client, keys)
    for phase, stall in (("prefill", 40.0), ("decode", 0.0)):
        _write_report(redis_client, keys, phase, 0.5, changed_at=time.time(),
                      share_switch_ms=9000.0 if stall else 0.0, share_switch_stall_ms=stall)
    controller.tick()
    assert controller.policy.config.switch_cost_ms == 9000.0     # the standby's start-up and the pause
    assert controller.policy.config.switch_pause_ms == 40.0      # of it, the pause delays a move's replay
    assert controller.policy.config.hold.dwell_ms(9000.0) == 36_000.0    # a change lasts 4x what it costs


def _state(redis_url: str, prefix: str, pid: int, start: int | None, argv=("worker",)) -> stack.StackState:
    record = stack.ProcessRecord("decode", pid, start, 2, 1, 0, "grpc", "/dev/null", tuple(argv),
                                 env=(("A", "1"),))
    return stack.StackState("s", "split", "id", prefix, "duoserve-id-", redis_url, True, None, None, None, None,
                            0.0, processes=(record,))


def test_supervisor_follows_a_chain_of_successors(redis_server, redis_client, keys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    successor = subprocess.Popen(["sleep", "30"])
    try:
        start = stack.process_start_time(successor.pid)
        redis_client.hset(f"{keys.prefix}:successors",
                          mapping={"111": f"{gone.pid}:1", str(gone.pid): f"{successor.pid}:{start}"})
        followed = stack.follow_successions(_state(redis_server.url, keys.prefix, 111, 5))
        assert [(r.name, r.pid, r.start_time) for r in followed.processes] == [("decode", successor.pid, start)]
        wire.record_launch(redis_client, keys.prefix, "decode", wire.StandbyLaunch("w", successor.pid, start,
                                                                                   ("new", "argv"), 70))
        followed = stack.follow_successions(_state(redis_server.url, keys.prefix, 111, 5))
        assert followed.processes[0].argv == ("new", "argv")        # the command line it was started with
        assert dict(followed.processes[0].env) == {"A": "1", wire.PERCENTAGE_ENV: "70"}
        redis_client.hset(f"{keys.prefix}:successors", str(gone.pid), f"{successor.pid}:{start + 1}")   # recycled
        redis_client.delete(f"{keys.prefix}:succession:standbys")
        followed = stack.follow_successions(_state(redis_server.url, keys.prefix, 111, 5))
        assert [r.pid for r in followed.processes] == [successor.pid] and not stack.stack_status(followed)[0].alive
        unreachable = stack.follow_successions(_state("redis://127.0.0.1:1/0", keys.prefix, 111, 5))
        assert [r.pid for r in unreachable.processes] == [111]          # no Redis: the state file as it is
    finally:
        successor.kill()
        successor.wait()


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return got


def test_the_supervisor_starts_the_standby_and_reports_its_death(redis_server, redis_client, keys, tmp_path):
    """A StandbyRequest of the role's live process: one standby from the role's command line (not two,
    however many ticks), listed beside the worker; killed before it is ready, the worker is told."""
    worker = subprocess.Popen(["sleep", "60"])
    popens: dict[int, subprocess.Popen] = {}
    said: list[str] = []
    standbys = Standbys(popens, said.append)
    try:
        start = stack.process_start_time(worker.pid)
        argv = (sys.executable, "-c", "import time; time.sleep(60)", "--cpus", "1")
        state = _state(redis_server.url, keys.prefix, worker.pid, start, argv)
        state = replace(state, processes=(replace(state.processes[0], log=str(tmp_path / "d.log")),))
        stale = wire.StandbyRequest("decode", "decode-0", 1, 1, (0, 1), 0, time.time())
        wire.request_standby(redis_client, keys.prefix, stale)
        standbys.tick(state)
        assert not popens                                              # not the role's process: nothing started
        request = wire.StandbyRequest("decode", "decode-1", worker.pid, start, (0, 1), 0, time.time())
        wire.request_standby(redis_client, keys.prefix, request)
        standbys.tick(state)
        standbys.tick(state)
        launch = wire.launch_for(redis_client, keys.prefix, "decode", "decode-1")
        assert launch is not None and list(popens) == [launch.pid], said
        assert launch.argv == argv[:3] + ("--cpus", "0,1")             # new cores, no --takeover-from
        assert popens[launch.pid].args[-2:] == ["--takeover-from", "decode-1"]
        again = Standbys({}, said.append)        # a supervisor started again mid-succession: no second standby
        again.tick(state)
        assert not again.popens and wire.launch_for(redis_client, keys.prefix, "decode", "decode-1") == launch
        again.close()
        followed = stack.follow_successions(state)
        assert [r.pid for r in followed.processes] == [worker.pid, launch.pid]   # `down` stops both
        popens[launch.pid].kill()
        popens[launch.pid].wait()
        _wait(lambda: standbys.tick(state) or not popens)
        status = wire.pop_status(redis_client, keys.prefix, "decode-1")
        assert status is not None and not status.ready and "before it was ready" in status.error
        assert any("before taking over" in line for line in said)
    finally:
        standbys.close()
        for p in (worker, *popens.values()):
            p.kill()
            p.wait()


def test_wire_round_trip_of_a_switch(redis_client, keys):
    request = wire.StandbyRequest("prefill", "prefill-1", 10, 20, (0,), 0, 1.0)
    wire.request_standby(redis_client, keys.prefix, request)
    assert wire.request_of(redis_client, keys.prefix, "prefill", "prefill-1") == request
    assert wire.request_of(redis_client, keys.prefix, "prefill", "prefill-2") is None
    wire.signal_status(redis_client, keys.prefix, "prefill-1", wire.StandbyStatus(11, ready=True))
    assert wire.pop_status(redis_client, keys.prefix, "prefill-1") == wire.StandbyStatus(11, True)
    state = SuccessionState("prefill-1", 1.0, (0,), 64, 1.0, 2.0, (), ("1-0",))
    pipe = redis_client.pipeline(transaction=True)
    wire.hand_over(pipe, keys.prefix, "prefill", state, 10, wire.StandbyLaunch("prefill-1", 11, 21, ()))
    pipe.execute()
    assert wire.wait_state(redis_client, keys.prefix, "prefill-1", timeout_s=1) == state
    assert wire.successors(redis_client, keys.prefix) == {10: (11, 21)}
    assert wire.requests(redis_client, keys.prefix) == {}


def test_a_worker_containers_reaper_starts_its_standby(redis_client, keys):
    """compose runs no supervisor: the reaper answers its own workers' requests (duoserve/reaper.py)."""
    import os
    import signal

    from duoserve.reaper import ContainerStandbys, ReaperConfig
    config = ReaperConfig.of([sys.executable, "-c", "import time; time.sleep(30)", "services.decode.main",
                              "--key-prefix", keys.prefix, "--cpus", "1"], {"REDIS_URL": "redis://x"})
    assert (config.role, config.key_prefix, config.redis_url) == ("decode", keys.prefix, "redis://x")
    worker = subprocess.Popen(config.argv, start_new_session=True)
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)         # not of the group
    launcher = ContainerStandbys(config, redis_client)
    launcher.started.append(worker.pid)
    try:
        start = stack.process_start_time(other.pid)
        wire.request_standby(redis_client, keys.prefix, wire.StandbyRequest("decode", "d-0", other.pid, start, (0,),
                                                                             0, 1.0))
        launcher.tick()
        assert wire.launch_for(redis_client, keys.prefix, "decode", "d-0") is None
        start = stack.process_start_time(worker.pid)
        wire.request_standby(redis_client, keys.prefix, wire.StandbyRequest("decode", "d-1", worker.pid, start, (0,),
                                                                             0, 1.0))
        launcher.tick()
        launcher.tick()                                               # one standby, not two
        launch = wire.launch_for(redis_client, keys.prefix, "decode", "d-1")
        assert launch is not None and launcher.started == [worker.pid, launch.pid]   # signals reach both groups
        assert launch.argv[-2:] == ("--cpus", "0")
        cmdline = _wait(lambda: open(f"/proc/{launch.pid}/cmdline").read())      # once it has exec'd
        assert cmdline.split("\0")[-3:-1] == ["--takeover-from", "d-1"]
    finally:
        for pid in launcher.started:
            os.killpg(pid, signal.SIGKILL)
        worker.wait()
        other.kill()
        other.wait()
        for pid in launcher.started[1:]:
            os.waitpid(pid, 0)                          # our child: reaped


class _FakeWorker:
    """What Succession uses of a Worker (services/worker/loop.py), without an engine."""

    def __init__(self, client, keys) -> None:
        from types import SimpleNamespace
        self.config = replace(_config(device="cuda"), worker_id="decode-9-a")   # cuda: no cores of ours move
        self.client, self.keys = client, keys
        self.control = WorkerControl(ShareState(0.5, (), 0))
        self.stats = SimpleNamespace(iterations=7)
        self.exported: list[ShareState] = []

    def report(self) -> None:
        pass

    def export_state(self, share: ShareState) -> SuccessionState:
        self.exported.append(share)
        return SuccessionState(self.config.worker_id, share.share, (), 0, share.requested_at, time.time())


def _begin(worker: _FakeWorker, share: float) -> tuple:
    from services.worker.succession import Succession
    succession = Succession(worker, release_ports=lambda: None)
    requested, _ = worker.control.request_share(ShareState(share, (), 0), lambda c, n: True)
    succession.begin(worker.control.take_requested_share())
    return succession, requested


def test_the_retiring_worker_keeps_serving_when_its_standby_dies(redis_client, keys):
    worker = _FakeWorker(redis_client, keys)
    succession, _ = _begin(worker, 0.7)
    request = wire.request_of(redis_client, keys.prefix, "decode", "decode-9-a")
    assert request is not None and request.mps_percentage == 70 and worker.control.retuning
    queued, status = worker.control.request_share(ShareState(0.3, (), 0), lambda c, n: True)
    assert status is ShareStatus.QUEUED
    dead = subprocess.Popen(["true"])
    dead.wait()
    wire.record_launch(redis_client, keys.prefix, "decode", wire.StandbyLaunch("decode-9-a", dead.pid, 1, ()))
    assert succession.poll() is False
    assert not succession.pending and not worker.control.retuning and worker.control.share.share == 0.5
    assert wire.requests(redis_client, keys.prefix) == {}                  # withdrawn
    assert worker.control.take_requested_share() == queued                # the queued share: taken next


def test_no_supervisor_no_succession(redis_client, keys, monkeypatch):
    from services.worker import succession as worker_succession
    monkeypatch.setattr(worker_succession, "LAUNCH_TIMEOUT_S", 0.0)
    worker = _FakeWorker(redis_client, keys)
    succession, _ = _begin(worker, 0.7)
    time.sleep(0.01)
    assert succession.poll() is False and not succession.pending and worker.control.share.share == 0.5


def test_the_switch_hands_the_state_over_and_stops_the_worker(redis_client, keys):
    worker = _FakeWorker(redis_client, keys)
    succession, requested = _begin(worker, 0.7)
    standby = subprocess.Popen(["sleep", "30"])
    try:
        start = stack.process_start_time(standby.pid)
        wire.record_launch(redis_client, keys.prefix, "decode", wire.StandbyLaunch("decode-9-a", standby.pid, start, ()))
        assert succession.poll() is False                                  # launched, not ready
        wire.signal_status(redis_client, keys.prefix, "decode-9-a", wire.StandbyStatus(standby.pid, ready=True))
        assert succession.poll() is True and worker.control.stopping
        assert worker.exported == [requested]
        state = wire.wait_state(redis_client, keys.prefix, "decode-9-a", timeout_s=1)
        assert state is not None and state.share == 0.7
        import os
        assert wire.successors(redis_client, keys.prefix) == {os.getpid(): (standby.pid, start)}
    finally:
        standby.kill()
        standby.wait()


def test_a_stack_started_with_restart_never_still_gets_its_standbys(redis_server, redis_client, keys, tmp_path):
    """A succession is no restart: the supervisor of a `--restart never` stack starts standbys too."""
    import threading

    from duoserve.supervisor import Supervisor
    worker = subprocess.Popen(["sleep", "60"])
    stop = threading.Event()
    torn_down: list = []
    try:
        start = stack.process_start_time(worker.pid)
        state = _state(redis_server.url, keys.prefix, worker.pid, start,
                       (sys.executable, "-c", "import time; time.sleep(60)"))
        state = replace(state, processes=(replace(state.processes[0], log=str(tmp_path / "d.log")),))
        stack.write_state(tmp_path / "state.json", state)
        supervisor = Supervisor(tmp_path / "state.json", restart=False, stop_requested=stop, say=lambda m: None,
                                teardown=torn_down.append)
        thread = threading.Thread(target=supervisor.run, args=(state,))
        thread.start()
        wire.request_standby(redis_client, keys.prefix, wire.StandbyRequest("decode", "decode-1", worker.pid, start,
                                                                             (0,), 0, time.time()))
        launch = _wait(lambda: wire.launch_for(redis_client, keys.prefix, "decode", "decode-1"))
        assert launch.pid in supervisor.popens and thread.is_alive()
        stop.set()
        thread.join(10)
        assert torn_down and [r.pid for r in torn_down[0].processes] == [worker.pid]
    finally:
        stop.set()
        worker.kill()
        worker.wait()
        for popen in supervisor.popens.values():
            popen.kill()
            popen.wait()
