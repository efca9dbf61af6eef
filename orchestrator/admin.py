"""The Admin gRPC service (duoctl's server): converts and delegates to the Controller.

Who may call it is decided before it runs (services.common.auth, set up in orchestrator.main).
A call that needs Redis while it does not answer gets UNAVAILABLE, saying to retry.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import grpc

from duoserve.v1 import admin_pb2 as pb
from duoserve.v1 import admin_pb2_grpc
from orchestrator.controller import Controller
from orchestrator.policy import SLO, PolicyMode, Shares
from services.common.redis_retry import CONNECTION_ERRORS, UNREACHABLE
from services.common.shares import UnitSpace

LATENCY_WINDOW_S = 120.0      # SLO attainment is judged over this much recent history
STALE_REPORT_S = 10.0         # a worker silent this long is not listed


def _needs_redis(method: Callable) -> Callable:
    """UNAVAILABLE, not UNKNOWN with a traceback, while Redis does not answer."""
    @functools.wraps(method)
    def call(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except CONNECTION_ERRORS:
            context.abort(grpc.StatusCode.UNAVAILABLE, UNREACHABLE)
    return call


def _shares_pb(s: Shares, units: UnitSpace) -> pb.Shares:
    """The shares, and the cores / SMs each buys (services.common.shares: what the workers are sent)."""
    return pb.Shares(prefill=s.prefill, decode=s.decode, token_budget=s.token_budget,
                     prefill_units=units.units_for(s.prefill), decode_units=units.units_for(s.decode))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency(values: list[float], target: float) -> pb.LatencyStats:
    return pb.LatencyStats(p50_ms=_percentile(values, 0.5), p90_ms=_percentile(values, 0.9),
                           p99_ms=_percentile(values, 0.99), target_ms=target,
                           attainment=sum(v <= target for v in values) / len(values) if values else 0.0,
                           num_samples=len(values))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, controller: Controller, backend: str) -> None:
        self.controller = controller
        self.backend = backend

    @_needs_redis
    def GetStatus(self, request, context):
        c = self.controller
        snap = c.last_snapshot or c.state.snapshot()
        latencies = c.state.recent_latencies(LATENCY_WINDOW_S)
        workers = [pb.WorkerStatus(phase=r.phase, worker_id=r.worker_id, target=r.grpc_target, share=r.share,
                                   cpu_ids=list(r.cpu_ids), token_budget=r.token_budget, num_running=r.num_running,
                                   num_waiting=r.num_waiting, iterations=r.iterations, age_s=snap.now - r.updated_at,
                                   measured_units=r.units_used, units_total=r.units_total, units_kind=r.units_kind,
                                   host_ms=r.host_ms, prefix_caching=r.prefix_caching,
                                   prefix_query_tokens=r.prefix_query_tokens, prefix_hit_tokens=r.prefix_hit_tokens)
                   for r in snap.workers.values() if snap.now - r.updated_at < STALE_REPORT_S or r.iterations == 0]
        last = c.last
        return pb.StackStatus(
            workers=workers, slo=self._slo_pb(c.slo), policy=self._policy_state(),
            queue_waiting=len(snap.waiting), kv_blocks_free=snap.kv_free_blocks, kv_blocks_total=snap.kv_total_blocks,
            kv_blocks_cached=snap.kv_cached_blocks, kv_blocks_evictable=snap.kv_evictable_blocks,
            queue_prompt_tokens=sum(w.prompt_tokens for w in snap.waiting),
            queue_uncached_tokens=sum(w.uncached_tokens for w in snap.waiting),
            ttft=_latency([lat.ttft_ms for lat in latencies], c.slo.ttft_ms),
            tpot=_latency([lat.tpot_ms for lat in latencies if lat.num_completion_tokens > 1], c.slo.tpot_ms),
            model_fit=self.GetModelFit(request, context), at_risk=(last.at_risk or "") if last else "",
            last_reason=last.reason if last else "")

    @_needs_redis
    def SetSLO(self, request, context):
        try:
            slo = SLO(request.ttft_ms, request.tpot_ms, (request.percentile or 90.0) / 100.0, request.prefer or "tpot")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"slo: {e}")
        self.controller.set_slo(slo)
        return self._slo_pb(slo)

    @_needs_redis
    def SetPolicy(self, request, context):
        try:
            self.controller.set_mode(PolicyMode(request.mode))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode: {e} (auto, static or manual; "
                          "manual needs shares: duoctl share set)")
        return self._policy_state()

    @_needs_redis
    def PinShares(self, request, context):
        for name in ("prefill", "decode"):
            if not 0.0 < getattr(request, name) <= 1.0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: a share must be in (0, 1]")
        if request.token_budget < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token_budget: must be >= 0")
        current = self.controller.last.shares if self.controller.last else self.controller.default_shares()
        pinned = Shares(request.prefill, request.decode, request.token_budget or current.token_budget)
        self.controller.pin(pinned)
        # What was pinned (the workers get it at the next tick), not the decision still in force.
        return pb.PolicyState(mode=self.controller.policy.mode.value, shares=_shares_pb(pinned, self.controller.model.units))

    @_needs_redis
    def GetHistory(self, request, context):
        decisions = []
        for d in self.controller.state.history(request.limit or 50):
            decisions.append(pb.Decision(time_unix=d["time_unix"], shares=pb.Shares(**d["shares"]),
                                         changed=d["changed"], reason=d["reason"], at_risk=d["at_risk"],
                                         predicted_ttft_ms=d["predicted_ttft_ms"],
                                         predicted_tpot_ms=d["predicted_tpot_ms"], mode=d["mode"]))
        return pb.History(decisions=decisions)

    def GetModelFit(self, request, context):
        model = self.controller.model
        errors = model.error_stats()
        phases = []
        for phase, coeffs in model.coefficients.items():
            err = errors.get(phase)
            phases.append(pb.PhaseFit(
                phase=phase, coefficients=[pb.Coefficient(name=k, value=v) for k, v in
                                           zip(("overhead_ms", "linear", "attention", "memory"), coeffs.as_tuple())],
                median_rel_error=err.median if err else 0.0, p90_rel_error=err.p90 if err else 0.0,
                num_samples=model.num_samples(phase)))
        return pb.ModelFit(backend=self.backend, phases=phases, unit=model.units.unit, num_units=model.units.num_units)

    def _policy_state(self) -> pb.PolicyState:
        c = self.controller
        shares = c.last.shares if c.last else (c.policy.pinned or c.default_shares())
        return pb.PolicyState(mode=c.policy.mode.value, shares=_shares_pb(shares, c.model.units))

    @staticmethod
    def _slo_pb(slo: SLO) -> pb.SLO:
        return pb.SLO(ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms, percentile=slo.percentile * 100, prefer=slo.prefer)
