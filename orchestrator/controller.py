"""The orchestrator's loop: read the stack from Redis, learn, decide, push shares to the workers.

A tick's life:
  learn     new iteration samples -> the performance model (honest error first, refit every few ticks)
  observe   queue (arrival, prompt length and cached prefix of every prefill-stream entry), decode batch,
            KV free space
  decide    the policy (auto/static/manual) picks shares and the prefill token budget, with a reason
  act       a changed decision is sent with SetComputeShare to each worker and recorded in Redis

Its settings (SLO, mode, pinned shares) live in Redis, so a restarted orchestrator resumes them;
the workers keep their last share meanwhile. While Redis does not answer the loop pauses (one log
line when it goes, one when it is back) and then goes on where it was.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, replace

import grpc
from prometheus_client import CollectorRegistry, Gauge

from duoserve.credentials import bearer
from duoserve.v1 import worker_pb2, worker_pb2_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.perf_model import PerfModel
from orchestrator.policy import SLO, Decision, Policy, PolicyMode, QueueState, Shares, WaitingRequest
from orchestrator.redis_state import RedisState, Snapshot
from services.common.redis_retry import CONNECTION_ERRORS, Outage, wait_until_up
from services.common.shares import PhaseUnits, assign

log = logging.getLogger("duoserve.orchestrator")
STATUS_NAMES = {worker_pb2.SHARE_STATUS_APPLIED: "applied", worker_pb2.SHARE_STATUS_ACCEPTED: "accepted",
                worker_pb2.SHARE_STATUS_RETUNING: "retuning by succession",
                worker_pb2.SHARE_STATUS_QUEUED: "queued behind a succession"}


@dataclass(frozen=True, slots=True)
class Accepted:
    """A worker's SetComputeShare reply: the share it will be at, and its clock when it said so. Its
    report speaks for it again once written at or after `changed_at` (WorkerReport.share_changed_at)."""

    share: float
    token_budget: int
    changed_at: float                  # the reply's changed_at_unix_ms, in seconds
    status: str                        # STATUS_NAMES: what it does with it


class ControllerMetrics:
    """The orchestrator's Prometheus metrics: the model's honest prediction error and the shares it sets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.model_error = Gauge("duoserve:perf_model_relative_error", "Prediction error of the performance model",
                                 labelnames=["phase", "quantile"], registry=self.registry)
        self.share = Gauge("duoserve:compute_share_decided", "Shares the policy chose", labelnames=["phase"],
                           registry=self.registry)

    def update(self, model: PerfModel, shares: Shares) -> None:
        for phase, stats in model.error_stats().items():
            self.model_error.labels(phase=phase, quantile="0.5").set(stats.median)
            self.model_error.labels(phase=phase, quantile="0.9").set(stats.p90)
        self.share.labels(phase="prefill").set(shares.prefill)
        self.share.labels(phase="decode").set(shares.decode)


class Controller:
    """The policy, its inputs and its last decision, behind one lock (the Admin API runs in other threads)."""

    def __init__(self, config: OrchestratorConfig, state: RedisState, policy: Policy) -> None:
        self.config = config
        self.state = state
        self.policy = policy
        self.model: PerfModel = policy.model
        self.lock = threading.Lock()
        self.slo = SLO(config.ttft_ms, config.tpot_ms, config.percentile, config.prefer)
        self.last: Decision | None = None
        self.last_snapshot: Snapshot | None = None
        self.ticks = 0
        self.metrics = ControllerMetrics()
        self.accepted: dict[str, Accepted] = {}   # phase -> its reply to the last share sent, until its
                                                  # report reflects it
        self._restore()

    # ------------------------------------------------------------------ operator settings
    def _restore(self) -> None:
        """Settings a previous orchestrator left in Redis win over the command line."""
        saved = self.state.load_settings()
        if "slo" in saved:
            self.slo = SLO(**json.loads(saved["slo"]))
        if "pinned" in saved:
            self.policy.pin(Shares(**json.loads(saved["pinned"])))
        mode = saved.get("mode", self.config.policy)
        if mode != "manual" or self.policy.pinned is not None:
            self._set_mode(PolicyMode(mode))
        log.info("settings: SLO %s, policy %s", self.slo, self.policy.mode.value)

    def _set_mode(self, mode: PolicyMode) -> None:
        if mode is PolicyMode.STATIC and self.policy.config.static_shares is None:
            self.policy.config = replace(self.policy.config, static_shares=self.default_shares())
        self.policy.set_mode(mode)

    def set_slo(self, slo: SLO) -> None:
        with self.lock:
            self.slo = slo
            self.state.save_settings(slo=asdict(slo))

    def set_mode(self, mode: PolicyMode) -> None:
        with self.lock:
            self._set_mode(mode)
            self.state.save_settings(mode=mode.value)

    def pin(self, shares: Shares) -> None:
        with self.lock:
            self.policy.pin(shares)
            self.state.save_settings(mode="manual", pinned=asdict(shares))

    def default_shares(self) -> Shares:
        """Half and half in whole units (cores, or TPCs); with one unit, both phases share it."""
        space = self.model.units
        half = space.units_for(0.5)
        rest = space.num_units - half
        return Shares(space.share_of(half), space.share_of(rest or half), 2048)

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event) -> None:
        outage = Outage(log, "the control loop pauses; the workers keep their shares")
        while not stop.wait(self.config.tick_ms / 1000):
            try:
                self.tick()
            except CONNECTION_ERRORS as e:
                outage.lost(e)
                if wait_until_up(self.state.client, stop.wait):
                    outage.back()
            except (grpc.RpcError, OSError, ValueError) as e:   # a worker restarting
                log.warning("tick failed: %s", e)

    def tick(self) -> Decision | None:
        for sample in self.state.new_timings():
            self.model.observe(sample)
        self.ticks += 1
        if self.ticks % self.config.refit_every == 0:
            self.model.refit()
        snap = self.state.snapshot()
        self.last_snapshot = snap
        current = self._current_shares(snap)
        if current is None:
            return None                          # workers not up yet (or colocated: nothing to split)
        with self.lock:
            self._adopt_switch_cost(snap)
            decision = self.policy.decide(self._queue_state(snap), current, self.slo)
            changed = decision.shares != current
            if changed:
                self._apply(decision.shares, snap)
            if changed or self.last is None or decision.at_risk != self.last.at_risk:
                self._record(decision, changed)
            self.last = decision
        self.metrics.update(self.model, decision.shares)
        return decision

    def _adopt_switch_cost(self, snap: Snapshot) -> None:
        """The cost the workers measured for their last share change replaces the configured one (the
        slower phase's): on a retune by handover, the SetComputeShare call to the successor's first
        iteration (the standby's start-up and the pause), of which the pause is device time lost; on the
        CPU's in-place change, the cores and torch's pool moved at a boundary (all of it a pause). The
        policy charges the cost in its band and its dwell, and delays a move's replay by the pause."""
        workers = snap.workers.values()
        cost = max((w.share_switch_ms for w in workers), default=0.0)
        pause = min(cost, max((w.share_switch_stall_ms for w in workers), default=0.0))
        config = self.policy.config
        if cost > 0 and (cost, pause) != (config.switch_cost_ms, config.switch_pause_ms):
            self.policy.config = replace(config, switch_cost_ms=cost, switch_pause_ms=pause)
            log.info("switch cost now %.1f ms, of it a %.1f ms pause (measured)", cost, pause)

    def _current_shares(self, snap: Snapshot) -> Shares | None:
        """The shares the workers are at or moving to. A worker's report says so (the share it last
        accepted, pending or not), unless it was written before the worker's reply to the share sent
        last: then the reply does. No timer: a share queued behind a succession, or a succession
        that takes long, is never sent twice; one that failed shows in the next report (the old
        share, not pending), and the policy decides again from there."""
        prefill, decode = snap.workers.get("prefill"), snap.workers.get("decode")
        if prefill is None or decode is None:
            return None
        share, budget = {}, prefill.token_budget
        for phase, report in (("prefill", prefill), ("decode", decode)):
            accepted = self.accepted.get(phase)
            if accepted is not None and 0 < report.share_changed_at < accepted.changed_at:
                share[phase] = accepted.share
                if phase == "prefill" and accepted.token_budget:
                    budget = accepted.token_budget
            else:
                self.accepted.pop(phase, None)     # the report has caught up: it speaks for the worker
                share[phase] = report.share
        return Shares(share["prefill"], share["decode"], budget)

    def _accept(self, phase: str, reply: worker_pb2.ComputeShare, budget: int | None) -> None:
        """Act on a worker's reply: what it accepted is where it stands until its report catches up."""
        status = STATUS_NAMES.get(reply.status, "accepted")
        self.accepted[phase] = Accepted(reply.share, reply.token_budget or (budget or 0),
                                        reply.changed_at_unix_ms / 1000, status)
        if reply.status in (worker_pb2.SHARE_STATUS_RETUNING, worker_pb2.SHARE_STATUS_QUEUED):
            log.info("%s: share %.2f %s", phase, reply.share, status)

    @staticmethod
    def _queue_state(snap: Snapshot) -> QueueState:
        decode = snap.workers.get("decode")
        return QueueState(
            now=snap.now, waiting=[WaitingRequest(w.arrival_time, w.prompt_tokens, cached_tokens=w.cached_tokens)
                                   for w in snap.waiting],
            decode_batch_size=decode.num_running if decode else 0,
            decode_context_tokens=decode.context_tokens if decode else 0,
            kv_free_blocks=snap.kv_free_blocks, kv_total_blocks=snap.kv_total_blocks, block_size=snap.block_size)

    def phase_units(self, shares: Shares) -> tuple[PhaseUnits, PhaseUnits]:
        """Each phase's units (services.common.shares): cores on the CPU (prefill's from the front, decode's
        from the back), SMs in TPC steps on CUDA; the same rounding the model predicted with."""
        return assign(self.model.units, shares.prefill, shares.decode, self.config.stack_cpus)

    def _apply(self, shares: Shares, snap: Snapshot) -> None:
        prefill, decode = self.phase_units(shares)
        for phase, given, budget in (("prefill", prefill, shares.token_budget), ("decode", decode, None)):
            report = snap.workers[phase]
            request = worker_pb2.SetComputeShareRequest(share=given.share, cpu_ids=list(given.cpu_ids),
                                                        num_units=given.units)
            if budget:
                request.token_budget = budget
            with grpc.insecure_channel(report.grpc_target) as channel:      # loopback: no TLS (services.common.tls)
                reply = worker_pb2_grpc.WorkerStub(channel).SetComputeShare(request, timeout=5,
                                                                            metadata=bearer(self.config.secret))
            self._accept(phase, reply, budget)

    def _record(self, decision: Decision, changed: bool) -> None:
        entry = {"time_unix": time.time(), "shares": asdict(decision.shares), "changed": changed,
                 "reason": decision.reason, "at_risk": decision.at_risk or "", "mode": decision.mode.value,
                 "predicted_ttft_ms": decision.predicted_ttft_ms or 0.0,
                 "predicted_tpot_ms": decision.predicted_tpot_ms}
        self.state.record_decision(entry)
        if changed:
            log.info("shares -> prefill %.2f decode %.2f budget %d: %s", decision.shares.prefill,
                     decision.shares.decode, decision.shares.token_budget, decision.reason)
