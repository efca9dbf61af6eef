"""The controller's decision and apply path on a fake device, without a GPU: on "cuda" the shares are
SMs in TPC steps predicted with GPU coefficients, sent as SMs with an empty core list, and the worker
turns them into the MPS percentage whose cap gives those SMs back; on the CPU, cores as before.
The workers are real WorkerServicers on loopback gRPC, the Redis state a stand-in."""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from duoserve.v1 import worker_pb2_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import Controller
from orchestrator.main import _measured_sms
from orchestrator.perf_model import LLAMA3_8B, PerfModel, device_for, priors
from orchestrator.policy import Policy, PolicyConfig, Shares
from orchestrator.redis_state import Snapshot, Waiting
from services.common.contracts import WorkerReport
from services.common.shares import UnitSpace
from services.worker.compute_units import ComputeUnits
from services.worker.config import Phase, WorkerConfig
from services.worker.control import ShareState, WorkerControl
from services.worker.succession import mps_percentage
from services.worker.servicer import WorkerServicer


class FakeState:
    """What the Controller reads and writes in Redis: settings, reports, decisions."""

    def __init__(self, reports: dict[str, WorkerReport]) -> None:
        self.reports, self.settings, self.decisions = reports, {}, []
        self.waiting: tuple[Waiting, ...] = ()

    def load_settings(self) -> dict[str, str]:
        return dict(self.settings)

    def save_settings(self, **settings: object) -> None:
        self.settings.update({k: str(v) for k, v in settings.items()})

    def new_timings(self) -> list:
        return []

    def snapshot(self) -> Snapshot:
        return Snapshot(time.time(), self.waiting, dict(self.reports), 100, 100)

    def record_decision(self, entry: dict) -> None:
        self.decisions.append(entry)


def _report(phase: str, target: str, share: float, kind: str, total: int) -> WorkerReport:
    return WorkerReport(phase, f"{phase}-1", target, share, (), 2048 if phase == "prefill" else 0, 0, 0, 0, 100, 100,
                        time.time(), units_kind=kind, units_used=0, units_total=total)


@pytest.fixture
def workers(request):
    """A prefill and a decode WorkerServicer of the device asked for, on loopback ports."""
    device, stack_cpus, total = request.param
    made, servers = {}, []
    for phase in (Phase.PREFILL, Phase.DECODE):
        config = WorkerConfig(phase=phase, redis_url="", key_prefix="t", port=0, metrics_port=0,
                              arena_socket=Path("/nonexistent"), model=None, cache_dir=Path("/tmp"), device=device)
        control = WorkerControl(ShareState(0.5, stack_cpus, 0))
        control.publish_units(ComputeUnits("sm" if device == "cuda" else "core", 0, total))
        server = grpc.server(futures.ThreadPoolExecutor(2))
        worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(config, control, stack_cpus), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        made[phase.value] = (control, f"127.0.0.1:{port}")
    yield made
    for server in servers:
        server.stop(None)


def _controller(device: str, num_units: int, made, stack_cpus=(0, 1)) -> Controller:
    kind = "sm" if device == "cuda" else "core"
    reports = {phase: _report(phase, target, 0.5, kind, num_units) for phase, (_, target) in made.items()}
    config = OrchestratorConfig(redis_url="", key_prefix="t", port=1, stack_cpus=stack_cpus, device=device)
    model = PerfModel(device_for(device, num_units), LLAMA3_8B)
    return Controller(config, FakeState(reports), Policy(model, PolicyConfig(overlap=1.0)))


@pytest.mark.parametrize("workers", [("cuda", (0, 1), 132)], indirect=True)
def test_on_cuda_pinned_shares_go_out_as_sms_and_come_back_as_the_right_mps_caps(workers):
    controller = _controller("cuda", 132, workers)
    assert controller.model.device.kind == "gpu" and controller.model.prior == priors("gpu", LLAMA3_8B)
    assert controller.default_shares() == Shares(0.5, 0.5, 2048)           # 66 + 66 SMs
    controller.pin(Shares(1.0, 0.3, 1024))
    decision = controller.tick()
    assert decision.shares == Shares(1.0, 0.3, 1024)
    prefill, decode = (workers[p][0].wanted[0] for p in ("prefill", "decode"))
    assert (prefill.num_units, decode.num_units) == (132, 38)                 # 39.6 SMs: whole TPCs
    assert (prefill.share, decode.share) == (1.0, 38 / 132) and decode.cpu_ids == (0, 1)   # host cores kept
    assert prefill.token_budget == 1024 and decode.token_budget == 0
    # The worker's successor starts at the smallest percentage whose cap is those SMs.
    assert [mps_percentage(s.share) for s in (prefill, decode)] == [100, 29]
    assert UnitSpace.cuda(132).units_of_percentage(29) == 38


@pytest.mark.parametrize("workers", [("cuda", (0, 1), 114)], indirect=True)
def test_on_cuda_auto_decisions_are_whole_tpcs_of_the_measured_gpu(workers):
    controller = _controller("cuda", 114, workers)                          # an H100 PCIe: 114 SMs
    assert controller.model.units == UnitSpace.cuda(114)
    controller.state.reports["prefill"] = _report("prefill", workers["prefill"][1], 2 / 114, "sm", 114)
    # Queued long prompts at a 2-SM prefill: work that needs a move (an idle queue moves nothing).
    controller.state.waiting = tuple(Waiting(time.time() - 0.5, 300) for _ in range(4))
    controller.policy.config = replace(controller.policy.config, hold=replace(controller.policy.config.hold,
                                                                              persist_ticks=1))
    decision = controller.tick()
    for share in (decision.shares.prefill, decision.shares.decode):
        units = share * 114
        assert abs(units - round(units)) < 1e-9 and round(units) % 2 == 0   # SMs in TPC steps
    sent = [workers[p][0].wanted[0] for p in ("prefill", "decode")]
    changed = [s for s in sent if s.pending]                               # what a changed decision sent
    assert all(s.num_units % 2 == 0 and s.num_units == round(s.share * 114) for s in changed)
    assert decision.changed and changed                                    # the queue moved it


@pytest.mark.parametrize("workers", [("cuda", (0, 1), 132)], indirect=True)
def test_a_worker_refuses_sms_that_are_not_whole_tpcs_of_its_device(workers):
    from duoserve.v1 import worker_pb2
    _, target = workers["decode"]
    with grpc.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.SetComputeShare(worker_pb2.SetComputeShareRequest(share=0.5, num_units=37), timeout=5)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "multiple of 2" in e.value.details()
        reply = stub.SetComputeShare(worker_pb2.SetComputeShareRequest(share=0.5, num_units=66), timeout=5)
        assert (reply.share, reply.num_units, reply.pending) == (0.5, 66, True)


@pytest.mark.parametrize("workers", [("cpu", (0, 1, 2, 3), 4)], indirect=True)
def test_on_the_cpu_shares_go_out_as_cores_as_before(workers):
    controller = _controller("cpu", 4, workers, stack_cpus=(0, 1, 2, 3))
    assert controller.model.device.kind == "cpu" and controller.model.units == UnitSpace.cpu(4)
    controller.pin(Shares(0.75, 0.5, 512))
    controller.tick()
    prefill, decode = (workers[p][0].wanted[0] for p in ("prefill", "decode"))
    assert (prefill.cpu_ids, prefill.share, prefill.num_units) == ((0, 1, 2), 0.75, 3)
    assert (decode.cpu_ids, decode.share, decode.num_units) == ((2, 3), 0.5, 2)


def test_the_orchestrator_takes_the_sm_count_the_workers_measured():
    config = OrchestratorConfig(redis_url="", key_prefix="t", port=1, device="cuda")
    state = FakeState({"prefill": _report("prefill", "", 0.5, "sm", 66), "decode": _report("decode", "", 0.5, "sm", 132)})
    assert _measured_sms(config, state, threading.Event()) == 132              # the largest measured count
    pinned = OrchestratorConfig(redis_url="", key_prefix="t", port=1, device="cuda", num_sms=114)
    assert _measured_sms(pinned, state, threading.Event()) == 114
    stopped = threading.Event()
    stopped.set()
    assert _measured_sms(config, FakeState({}), stopped) is None               # asked to stop while waiting
    assert device_for("cuda", 114).num_units == 114 and device_for("cuda", 114).peak_flops_per_unit == 800e12 / 132
    with pytest.raises(ValueError):
        OrchestratorConfig(redis_url="", key_prefix="t", port=1, device="tpu")


@pytest.mark.parametrize("workers", [("cpu", (0, 1, 2, 3), 4)], indirect=True)
def test_a_cpu_worker_takes_a_core_count_from_its_end_of_the_stack_and_refuses_a_mismatch(workers):
    from duoserve.v1 import worker_pb2
    control, target = workers["decode"]
    with grpc.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        reply = stub.SetComputeShare(worker_pb2.SetComputeShareRequest(num_units=3), timeout=5)
        assert (list(reply.cpu_ids), reply.share, reply.num_units) == ([1, 2, 3], 0.75, 3)    # decode: the back
        for bad in (worker_pb2.SetComputeShareRequest(num_units=2, cpu_ids=[0]),
                    worker_pb2.SetComputeShareRequest(num_units=5)):
            with pytest.raises(grpc.RpcError) as e:
                stub.SetComputeShare(bad, timeout=5)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "num_units" in e.value.details()


def test_the_orchestrator_takes_device_and_sm_count_on_its_command_line(monkeypatch):
    from orchestrator.config import parse_args
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    config = parse_args(["--port", "1", "--device", "cuda", "--num-sms", "114", "--cpus", "0"])
    assert (config.device, config.num_sms) == ("cuda", 114)
    assert parse_args(["--port", "1", "--cpus", "0-1"]).device == "cpu"
