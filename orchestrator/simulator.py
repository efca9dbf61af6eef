"""Discrete-event simulator: a trace through the project's own Scheduler, Policy and PerfModel.

Pure Python (no torch, grpc, redis or numpy). Nothing is copied: the engines are
`services.engine.scheduler.Scheduler` objects over one `BlockManager`, an iteration lasts what
`PerfModel` predicts for the batch the scheduler chose, and the dynamic split is steered by
`Policy.decide` every tick. docs/simulator.md says what is and is not simulated.

A request's life in simulated time:
  arrives      at its trace time (scaled by the rate), or a conversation's turn a think time after the
               previous answer (orchestrator/sim_conversations.py), in the input queue of the prefill
               (or colocated) engine
  admitted     taken from the queue at an iteration boundary, while the scheduler holds < max_num_seqs;
               with prefix caching its prompt's leading cached blocks are reused (only the rest is prefilled)
  prefilled    in chunks the scheduler picks; each iteration ends PerfModel's prediction later
  first token  at the end of the iteration that sampled it: TTFT = that time - arrival
  handed off   split: prefill's postprocess returns it HANDED_OFF; decode admits it at its next boundary
  decoded      one token per decode iteration, until the trace's output length: TPOT = (finish - first
               token) / (output tokens - 1)
  preempted    the KV pool ran out: decode hands it back to the prefill queue for recompute; hybrid
               recomputes it first
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

from orchestrator.coresidency import CoResidency, for_device, iteration_demand, shared_fraction, stretch
from orchestrator.hold import HoldConfig
from orchestrator.perf_model import PerfModel
from orchestrator.policy import SLO, Policy, PolicyConfig, PolicyMode, QueueState, Shares, WaitingRequest
from orchestrator.prefix_view import CacheScope, PromptKeys
from orchestrator.sim_arrivals import Arrivals, TraceArrivals
from orchestrator.sim_calibration import Calibration, StackProfile
from orchestrator.sim_conversations import ConversationArrivals, ConversationWorkload
from orchestrator.sim_engine import SAMPLED, Engine
from orchestrator.sim_results import RunResult, run_result
from orchestrator.sim_trace import TraceRequest
from services.engine.blocks import BlockManager
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import RequestTooLarge, Scheduler, SchedulerConfig, SchedulerMode, SchedulerOutput
from services.engine.sequence import Sequence as Seq
from services.engine.sequence import SequenceStatus

INF = math.inf
FINISHED, HANDED_OFF = SequenceStatus.FINISHED, SequenceStatus.HANDED_OFF


@dataclass(frozen=True, slots=True)
class System:
    """One system under test."""

    name: str                              # e.g. "colocated-c1024", "split-static-70/30", "split-dynamic"
    layout: str                            # "colocated" | "split"
    chunk_size: int = 0                    # colocated: prompt tokens per iteration (chunked prefill)
    shares: Shares | None = None           # split: the fixed (static) or initial (dynamic) shares
    dynamic: bool = False                  # split: Policy (mode auto) moves the shares every tick

    def __post_init__(self) -> None:
        if self.layout not in ("colocated", "split"):
            raise ValueError("layout must be colocated or split")
        if self.layout == "colocated" and self.chunk_size < 1:
            raise ValueError("colocated needs a chunk_size")
        if self.layout == "split" and self.shares is None:
            raise ValueError("split needs shares")


@dataclass(frozen=True, slots=True)
class SimOptions:
    """What every run of a comparison shares besides the calibration."""

    slo: SLO
    attainment: float = 0.9                # the fraction of requests that must meet both SLOs
    early_stop: bool = True                # stop once that fraction can no longer be reached
    bw_contention: bool = True             # split: HBM bandwidth is shared by the two phases (see _duration)
    tick_ms: float | None = None           # None: the profile's
    switch_cost_ms: float | None = None
    overlap: float | None = None
    coresidency: CoResidency | None = None     # split: how the engines slow each other; None: the device's default
    hold: HoldConfig | None = None             # split-dynamic: the policy's time hysteresis; None: the default
    prefix_caching: bool = False               # the engines reuse cached blocks, and the policy sees them
                                               # (prompts then carry content: orchestrator/sim_arrivals.py)
    policy_sees_cache: bool = True             # False: the policy counts every prompt token (a control)


class Simulation:
    """One system over one trace at one rate."""

    def __init__(self, system: System, calibration: Calibration, options: SimOptions,
                 trace: Sequence[TraceRequest] | ConversationWorkload, rate_multiple: float, base_rate: float,
                 model: PerfModel | None = None) -> None:
        self.system, self.cal, self.options = system, calibration, options
        self.profile: StackProfile = calibration.profile
        self.model = model or calibration.build_model()
        self.trace = trace
        self.rate_multiple, self.rate_per_s = rate_multiple, base_rate * rate_multiple
        ingress = self.profile.ingress_ms      # the request reaches the engine's queue this much later
        kind = ConversationArrivals if isinstance(trace, ConversationWorkload) else TraceArrivals
        self.source: Arrivals = kind(trace, rate_multiple, ingress, options.prefix_caching)
        self.arrivals = self.source.arrivals   # by request index, ms; INF until sent
        self._loop_gap = self.profile.loop_gap_ms
        self.tick_ms = options.tick_ms or self.profile.tick_ms
        self.switch_cost_ms = self.profile.switch_cost_ms if options.switch_cost_ms is None else options.switch_cost_ms
        self.slo = options.slo
        self.coresidency = options.coresidency or for_device(self.model.device.kind)
        self._prompt_keys = PromptKeys()       # the policy's view of the waiting prompts' cached blocks
        n = self.source.num_requests
        self.first_ms: list[float] = [INF] * n
        self.done_ms: list[float] = [INF] * n
        self.out_tokens: list[int] = [0] * n  # generated when finished (the trace's length, or cut by the context)
        self.seqs: list[Seq | None] = [None] * n
        self.rejected = 0
        self.finished = 0
        self.failed = 0                       # requests known to miss an SLO
        self.counted = bytearray(n)           # 1: already in `failed`
        self._deadline_next = 0               # arrivals before this one are past their TTFT deadline
        self.allowed_failures = n - math.ceil(options.attainment * n - 1e-9)
        self.preemptions = 0
        self.share_changes = 0
        self.share_time = [0.0, 0.0, 0.0]     # prefill and decode shares summed over ticks, and the ticks
        self._coef = {p: c.as_tuple() for p, c in self.model.coefficients.items()}
        self._num_units = self.model.device.num_units
        self._peak_bw = self.model.device.peak_mem_bw
        self._build()

    # ------------------------------------------------------------------ set-up
    def _scheduler(self, mode: SchedulerMode, blocks: BlockManager, chunk: int, batched: int) -> Scheduler:
        p = self.profile
        return Scheduler(SchedulerConfig(mode=mode, block_size=self.cal.block_size, max_num_seqs=p.max_num_seqs,
                                         max_num_batched_tokens=batched, chunk_size=chunk,
                                         max_model_len=p.max_model_len, prefix_caching=self.options.prefix_caching),
                         blocks)

    def _build(self) -> None:
        s, p, n = self.system, self.profile, self._num_units
        self.policy: Policy | None = None
        if s.layout == "colocated":
            blocks = BlockManager(self.cal.num_kv_blocks_colocated)
            # SGLang-style: the chunk counts prompt tokens only; every running decode rides along.
            sched = self._scheduler(SchedulerMode.HYBRID, blocks, s.chunk_size, s.chunk_size + p.max_num_seqs)
            self.entry = Engine("colocated", "colocated", sched, n)
            self.engines = (self.entry,)
            self.prefill = self.decode = None
            self.shares = None
        else:
            blocks = BlockManager(self.cal.num_kv_blocks_split)
            prefill = self._scheduler(SchedulerMode.PREFILL, blocks, p.split_max_batched_tokens,
                                      p.split_max_batched_tokens)
            decode = self._scheduler(SchedulerMode.DECODE, blocks, p.split_max_batched_tokens, p.max_num_seqs)
            self.shares = s.shares
            prefill.token_budget = s.shares.token_budget
            self.prefill = Engine("prefill", "prefill", prefill, self.model.units_for(s.shares.prefill))
            self.decode = Engine("decode", "decode", decode, self.model.units_for(s.shares.decode))
            self.prefill.other, self.decode.other = self.decode, self.prefill
            self.entry = self.prefill
            self.engines = (self.prefill, self.decode)
            if s.dynamic:
                overlap = p.overlap if self.options.overlap is None else self.options.overlap
                self.policy = Policy(self.model, PolicyConfig(
                    mode=PolicyMode.AUTO, switch_cost_ms=self.switch_cost_ms, overlap=overlap,
                    probe_prompt_tokens=p.probe_prompt_tokens, coresidency=self.coresidency,
                    hold=self.options.hold or HoldConfig(min_dwell_ms=p.min_dwell_ms)))
        self.blocks = blocks

    # ------------------------------------------------------------------ the loop
    def run(self) -> RunResult:
        started, cpu_started = time.perf_counter(), time.process_time()
        source, i = self.source, 0             # i: requests sent so far
        engines = self.engines
        next_tick = 0.0 if self.policy is not None else INF
        t = 0.0
        params_cache: dict[int, SamplingParams] = {}
        while True:
            engine = engines[0] if len(engines) == 1 or engines[0].busy_until <= engines[1].busy_until else engines[1]
            t_engine = engine.busy_until
            t_arrival = source.next_ms
            if t_engine <= t_arrival and t_engine <= next_tick:
                if t_engine == INF:
                    break
                t = t_engine
                self._end_iteration(engine, t)
                self._start(engine, t)
                for other in engines:
                    if other is not engine and other.busy_until == INF:
                        self._start(other, t)        # hand-offs arrived, or blocks were freed
            elif t_arrival <= next_tick:
                t = t_arrival
                idx, prompt, output_tokens = source.pop()
                params = params_cache.get(output_tokens)
                if params is None:
                    params = params_cache[output_tokens] = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
                seq = Seq(str(idx), prompt, params, arrival_time=self.arrivals[idx] / 1000.0)
                self.seqs[idx] = seq
                self.entry.inbox.append(seq)
                i += 1
                if self.entry.busy_until == INF:
                    self._start(self.entry, t)
            else:
                t = next_tick
                self._tick(t)
                next_tick = t + self.tick_ms
                if all(e.busy_until == INF for e in engines):
                    if source.next_ms == INF:
                        next_tick = INF     # nothing runs and nothing will arrive: the run is over
                    elif source.next_ms > next_tick and not any(e.inbox or e.scheduler.has_work() for e in engines):
                        # Nothing to steer until the next arrival: skip the idle ticks.
                        next_tick += math.floor((source.next_ms - next_tick) / self.tick_ms) * self.tick_ms
            if self.options.early_stop:
                self._count_deadlines(t, i)
                if self.failed > self.allowed_failures:
                    break
        return run_result(self, t, time.perf_counter() - started, time.process_time() - cpu_started)

    def _count_deadlines(self, t: float, arrived: int) -> None:
        """Requests past their TTFT deadline without a first token have failed: count them now, so an
        overloaded run stops early instead of draining its queue."""
        k, arrivals, first, ttft = self._deadline_next, self.arrivals, self.first_ms, self.slo.ttft_ms
        while k < arrived and arrivals[k] + ttft < t:
            if first[k] == INF and not self.counted[k]:
                self.counted[k] = 1
                self.failed += 1
            k += 1
        self._deadline_next = k

    def _start(self, e: Engine, t: float) -> None:
        """An iteration boundary: apply a new share, take new work, schedule, and time the iteration."""
        stall = 0.0
        if e.pending_units is not None:
            e.units, e.pending_units = e.pending_units, None
            stall = self.switch_cost_ms
        sched = e.scheduler
        if e.pending_budget is not None:
            sched.token_budget, e.pending_budget = e.pending_budget, None
        inbox = e.inbox
        if inbox:
            room = e.max_num_seqs - len(sched.running) - len(sched.waiting)
            while inbox and room > 0:
                seq = inbox.popleft()
                if e.phase == "decode":
                    sched.admit_prefilled(seq)
                else:
                    try:
                        sched.add(seq)
                    except RequestTooLarge:
                        never = self.source.dropped(int(seq.request_id))   # a conversation's later turns
                        self.rejected += 1 + never
                        self.failed += 1 + never
                        self.counted[int(seq.request_id)] = 1
                        continue
                room -= 1
        if not (sched.running or sched.waiting):
            e.busy_until, e.batch = INF, None
            return
        out = sched.schedule()
        if out.preempted_ids:
            self.preemptions += len(out.preempted_ids)
            if e.phase == "decode":        # back to the prefill queue, with its tokens, for recompute
                self._requeue(out.preempted_ids)
        if not (out.prefill_chunks or out.decode_chunks):
            e.busy_until, e.batch = INF, None     # waits for KV blocks: woken when another iteration ends
            return
        e.batch = out
        e.busy_until = t + stall + self._duration(e, out, t)

    def _requeue(self, request_ids: Sequence[str]) -> None:
        """Decode preempted these (their blocks are freed): back to the prefill queue, as the worker does.
        An idle prefill engine picks them up when the decode iteration now starting ends."""
        for rid in request_ids:
            self.prefill.inbox.append(self.seqs[int(rid)])

    def _duration(self, e: Engine, out: SchedulerOutput, t: float) -> float:
        """PerfModel's iteration time at the engine's share, with the contention of a split while the other
        engine is busy. Co-residency (`SimOptions.coresidency`, orchestrator/coresidency.py): units both caps
        cover are shared by demand, HBM bandwidth device-wide, plus the residual interference. Disabled:
        overlapping units are time-shared (half each, as the policy then assumes), and when the two
        iterations draw more bandwidth than the device has, the memory-bound part stretches by the excess."""
        tokens = work = 0
        for c in out.prefill_chunks:
            q = len(c.token_ids)
            tokens += q
            work += q * (c.start_position + q)
        decodes = out.decode_chunks
        rows = len(decodes)
        context = 0
        for c in decodes:
            context += c.start_position + 1
        phase = e.phase
        sampled = rows if phase == "decode" else rows + len(out.prefill_chunks)
        e.iterations += 1
        other = e.other
        if other is None:
            return self._predict(phase, e.units, tokens, work, rows, context, sampled)[0]
        busy = other.busy_until != INF
        co = self.coresidency
        units = e.units
        shared = units + other.units - self._num_units
        if co.enabled:
            duration, e.demand = iteration_demand(self.model, phase, units, tokens, work, rows, context, sampled,
                                                  self._loop_gap)
            e.mem_frac = e.demand.bandwidth
            if not busy:
                return duration
            return duration * stretch(e.demand, other.demand, shared_fraction(units, other.units, self._num_units),
                                      co, self.options.bw_contention)
        if busy and shared > 0:
            units -= shared / 2
        duration, mem = self._predict(phase, units, tokens, work, rows, context, sampled)
        if not self.options.bw_contention:
            return duration
        e.mem_frac = mem * self.model.bandwidth(units) / self._peak_bw / duration
        if busy:
            load = e.mem_frac + other.mem_frac
            if load > 1.0:
                duration += mem * (load - 1.0)
        return duration

    def _predict(self, phase: str, units: float, tokens: int, work: int, rows: int, context: int,
                 sampled: int) -> tuple[float, float]:
        """(iteration ms with the loop gap, its memory-bound ms) alone at `units`."""
        f = self.model.features(units, tokens, work, rows, context, sampled)
        a0, a1, a2, a3 = self._coef[phase]
        mem = a3 * f[3] + (a2 * f[2] if phase == "decode" else 0.0)
        return a0 + a1 * f[1] + a2 * f[2] + a3 * f[3] + self._loop_gap, mem

    def _end_iteration(self, e: Engine, t: float) -> None:
        out = e.batch
        e.batch = None
        e.busy_until = INF
        advanced = e.scheduler.postprocess(out, SAMPLED)
        first, done, slo, counted = self.first_ms, self.done_ms, self.slo, self.counted
        for seq in advanced:
            idx = int(seq.request_id)
            if first[idx] == INF:
                first[idx] = t
                if t - self.arrivals[idx] > slo.ttft_ms and not counted[idx]:
                    counted[idx] = 1
                    self.failed += 1
            status = seq.status
            if status is FINISHED:
                done[idx] = t
                self.finished += 1
                out_tokens = self.out_tokens[idx] = len(seq.output_token_ids)
                if out_tokens > 1 and (t - first[idx]) / (out_tokens - 1) > slo.tpot_ms and not counted[idx]:
                    counted[idx] = 1
                    self.failed += 1
                self.source.finished(idx, t, seq)
            elif status is HANDED_OFF:
                self.decode.inbox.append(seq)

    # ------------------------------------------------------------------ the policy
    def _tick(self, t: float) -> None:
        """The orchestrator's tick: QueueState from the simulated state, Policy.decide, and the new shares
        and token budget handed to the engines for their next iteration boundary."""
        if self.policy is None:
            return
        pre, dec = self.prefill, self.decode
        waiting = self._not_admitted([*pre.inbox, *pre.scheduler.waiting])
        waiting += [WaitingRequest(s.arrival_time, s.num_tokens, s.num_computed_tokens) for s in pre.scheduler.running]
        batch = dec.scheduler.running
        context = 0
        for s in batch:
            context += s.num_tokens
        for s in dec.inbox:
            context += s.num_tokens
        state = QueueState(t / 1000.0, waiting, len(batch) + len(dec.inbox), context, self.blocks.num_free,
                           self.blocks.num_blocks, self.cal.block_size)
        decision = self.policy.decide(state, self.shares, self.slo)
        shares = decision.shares
        self.share_time[0] += shares.prefill
        self.share_time[1] += shares.decode
        self.share_time[2] += 1
        if shares == self.shares:
            return
        for e, share in ((pre, shares.prefill), (dec, shares.decode)):
            units = self.model.units_for(share)
            if units != (e.units if e.pending_units is None else e.pending_units):
                e.pending_units = units
                self.share_changes += 1
        pre.pending_budget = shares.token_budget
        self.shares = shares

    def _not_admitted(self, seqs: list[Seq]) -> list[WaitingRequest]:
        """The queue the policy sees of requests not admitted yet: with prefix caching, each of the
        oldest prompts with its cached tokens, looked up as the live orchestrator does
        (orchestrator/prefix_view.py)."""
        if not (self.options.prefix_caching and self.options.policy_sees_cache):
            return [WaitingRequest(s.arrival_time, s.num_tokens) for s in seqs]
        seqs.sort(key=lambda s: s.arrival_time)
        scope = CacheScope(self.cal.block_size, self.prefill.scheduler.config.cache_salt)
        # By request and length: a recompute's prompt is longer (its output so far).
        examined = self._prompt_keys.examine(scope, (((s.request_id, s.num_tokens),
                                                      lambda s=s: s.token_slice(0, s.num_tokens)) for s in seqs))
        run = {ident: self.blocks.cached_run(keys) for ident, keys in examined}
        return [WaitingRequest(s.arrival_time, s.num_tokens,
                               cached_tokens=run.get((s.request_id, s.num_tokens), 0) * scope.block_size) for s in seqs]

def simulate(system: System, calibration: Calibration, options: SimOptions, trace: Sequence[TraceRequest],
             rate_multiple: float, base_rate: float) -> RunResult:
    """Run one system over the trace at `rate_multiple` times its recorded rate."""
    return Simulation(system, calibration, options, trace, rate_multiple, base_rate).run()
