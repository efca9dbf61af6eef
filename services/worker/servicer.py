"""The Worker gRPC service: converts messages and delegates to `WorkerControl`; nothing else.

Runs in gRPC's thread pool beside the loop; health and reflection are served on the same port.
With the stack's secret set, every Worker call needs it as a bearer token (services.common.auth);
health and reflection stay open.
"""
from __future__ import annotations

import time
from concurrent import futures
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from duoserve.v1 import worker_pb2, worker_pb2_grpc
from services.common import auth, shares
from services.common.grpc_input import InputInterceptor
from services.worker.compute_units import ComputeUnits
from services.worker.config import Phase, WorkerConfig
from services.worker.control import ShareState, ShareStatus, WorkerControl
from services.worker.succession import needs_successor

PHASES = {Phase.PREFILL: worker_pb2.PHASE_PREFILL, Phase.DECODE: worker_pb2.PHASE_DECODE,
          Phase.COLOCATED: worker_pb2.PHASE_COLOCATED}
SERVICE_NAME = "duoserve.v1.Worker"
STATUSES = {ShareStatus.APPLIED: worker_pb2.SHARE_STATUS_APPLIED, ShareStatus.ACCEPTED: worker_pb2.SHARE_STATUS_ACCEPTED,
            ShareStatus.RETUNING: worker_pb2.SHARE_STATUS_RETUNING, ShareStatus.QUEUED: worker_pb2.SHARE_STATUS_QUEUED}


def share_to_pb(share: ShareState, status: ShareStatus, changed_at: float) -> worker_pb2.ComputeShare:
    return worker_pb2.ComputeShare(share=share.share, cpu_ids=list(share.cpu_ids), token_budget=share.token_budget,
                                   applied_at_iteration=share.applied_at_iteration,
                                   pending=status is not ShareStatus.APPLIED,
                                   applied_at_unix_ms=share.applied_at_unix_ms, status=STATUSES[status],
                                   changed_at_unix_ms=int(changed_at * 1000), num_units=share.num_units)


def units_to_pb(units: ComputeUnits | None) -> worker_pb2.ComputeUnits:
    if units is None:
        return worker_pb2.ComputeUnits()       # not measured yet
    return worker_pb2.ComputeUnits(kind=units.kind, used=units.used, total=units.total, error=units.error or "")


def _check_units(space: shares.UnitSpace, units: int) -> None:
    try:
        space.check_units(units)
    except ValueError as e:
        raise ValueError(f"num_units: {e}") from None


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig, control: WorkerControl, stack_cpus: tuple[int, ...]) -> None:
        self.config = config
        self.control = control
        self.stack_cpus = stack_cpus     # every core the stack may use; a share is a subset

    def SetComputeShare(self, request, context):
        """Validated and left for the loop; during a retune by succession it is queued behind it."""
        if request.HasField("token_budget") and request.token_budget < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token_budget: must be >= 1, got {request.token_budget}")
        try:
            share = (self._cuda_share if self.config.device == "cuda" else self._cpu_share)(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        budget = request.token_budget if request.HasField("token_budget") else 0
        requested, status = self.control.request_share(
            replace(share, token_budget=budget), lambda current, new: needs_successor(self.config, current, new))
        return share_to_pb(requested, status, requested.requested_at)

    def _cpu_share(self, request) -> ShareState:
        """Cores: the ones named, or that many of the stack's (num_units, else the share's; prefill's from
        the front, decode's from the back: services.common.shares)."""
        space = shares.UnitSpace.cpu(len(self.stack_cpus))
        cpu_ids = tuple(request.cpu_ids)
        allowed = set(self.stack_cpus)
        if any(c not in allowed for c in cpu_ids) or len(set(cpu_ids)) != len(cpu_ids):
            raise ValueError(f"cpu_ids: must be distinct cores of {sorted(allowed)}, got {list(cpu_ids)}")
        if request.num_units:
            _check_units(space, request.num_units)
            if cpu_ids and len(cpu_ids) != request.num_units:
                raise ValueError(f"num_units: {request.num_units} but {len(cpu_ids)} cpu_ids")
        if not cpu_ids:
            if not request.num_units and not 0.0 < request.share <= 1.0:
                raise ValueError(f"share: must be in (0, 1], got {request.share}")
            units = request.num_units or space.units_for(request.share)
            cpu_ids = shares.core_set(self.stack_cpus, units, from_back=self.config.phase is Phase.DECODE)
        return ShareState(space.share_of(len(cpu_ids)), cpu_ids, 0, num_units=len(cpu_ids))

    def _cuda_share(self, request) -> ShareState:
        """An MPS cap: the share as sent (its percentage: services.common.shares), checked against the
        SMs this worker measured on its device when num_units names them. Host threads keep their cores."""
        if not 0.0 < request.share <= 1.0:
            raise ValueError(f"share: must be in (0, 1], got {request.share}")
        measured = self.control.units
        units = request.num_units
        if units and measured is not None and measured.total > 0:
            _check_units(shares.UnitSpace.cuda(measured.total), units)
        return ShareState(request.share, self.control.share.cpu_ids, 0, num_units=units)

    def GetStats(self, request, context):
        s = self.control.stats
        return worker_pb2.WorkerStats(
            phase=PHASES[self.config.phase], worker_id=self.config.worker_id, share=share_to_pb(*self.control.wanted),
            num_running=s.num_running, num_waiting=s.num_waiting, iterations=s.iterations,
            tokens_processed=s.tokens_processed, requests_finished=s.requests_finished, preemptions=s.preemptions,
            last_iteration_ms=s.last_iteration_ms, last_batch_tokens=s.last_batch_tokens,
            kv_blocks_free=s.kv_blocks_free, kv_blocks_total=s.kv_blocks_total, draining=self.control.draining,
            units=units_to_pb(self.control.units))

    def Drain(self, request, context):
        self.control.drain()
        deadline = time.monotonic() + (context.time_remaining() or 30.0)
        while request.wait and time.monotonic() < deadline:
            s = self.control.stats
            if s.num_running == 0 and s.num_waiting == 0:
                break
            time.sleep(0.05)
        s = self.control.stats
        return worker_pb2.DrainResponse(drained=s.num_running == 0 and s.num_waiting == 0,
                                        num_running=s.num_running, num_waiting=s.num_waiting)


def start_worker_server(config: WorkerConfig, control: WorkerControl,
                        stack_cpus: tuple[int, ...]) -> tuple[grpc.Server, health.HealthServicer]:
    """Worker service + grpc.health.v1 (NOT_SERVING until the caller says ready) + reflection."""
    guard = auth.interceptors([config.secret], "the stack's secret (`duoserve up` keeps it in <stack dir>/secret)")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[*guard, InputInterceptor()],
                         options=[("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(config, control, stack_cpus), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"127.0.0.1:{config.port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{config.port}")
    server.start()
    return server, health_servicer


def set_serving(health_servicer: health.HealthServicer, is_serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)
