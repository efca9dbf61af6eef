"""The worker loop shared by prefill, decode and the colocated engine.

A request's life in a worker:
  prefill    read from the prefill queue (consumer group) -> prompt fed in chunks into blocks it
             owns in Redis -> first token sampled -> first token delivered to the gateway, then a
             Handoff (block ids, no tensors) published to decode -> queue entry acked
  decode     Handoff read from the admit stream, its KV already in the shared pool -> one token
             per iteration, delivered to the gateway -> finished: blocks freed in Redis;
             preempted: blocks freed, request re-queued to prefill with its tokens for recompute;
             a hand-off whose KV was in an arena memory that is gone (Handoff.kv_memory) goes back
             to prefill the same way
  colocated  prefill queue -> chunked-prefill hybrid batches -> tokens delivered (and recorded, as
             decode's are, for a worker that takes it over) -> finished
  cancelled  a CancelNotice (client gone, or a stop string seen by the gateway): the request is
             dropped at the next iteration boundary and its blocks are freed

Every iteration: apply a requested compute share, poll cancels and new work (a busy worker only
when its doorbell rang: doorbell.py), then schedule -> run -> sample -> postprocess, then publish
deliveries, and the blocks of finished requests, in one Redis pipeline sent on the publisher's
thread while the next iteration runs. Split decode asks for the blocks its rows need next on that
thread too, during the forward pass.

Redis going away stops an iteration wherever it stands: the worker lets go of what it holds, waits
for Redis, and takes up again what is recorded there (reconnect.py).
"""
from __future__ import annotations

import collections
import logging
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import redis

from services.common import stream_entries
from services.common.contracts import (Handoff, IterationSample, KeySpace, QueuedRequest, RequestedShare,
                                       SuccessionState, TokenDelivery, WorkerReport)
from services.common.redis_blocks import free_count_from, queue_free_count
from services.common.redis_queues import CancelWatcher, ensure_group, take_over_consumer
from services.common.redis_retry import DataEpoch, DataLost, Outage
from services.engine.blocks import blocks_for_tokens
from services.engine.llm_engine import sample_batch
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler
from services.engine.scheduler import RequestTooLarge, Scheduler, SchedulerOutput
from services.engine.sequence import FinishReason, Sequence, SequenceStatus
from services.worker.compute import apply_cpu_share
from services.worker.fence import KvWriteOrder, kv_fence
from services.worker.green import GreenRetune
from services.worker.compute_units import ComputeUnits, probe_compute_units
from services.worker.config import Phase, WorkerConfig
from services.worker.control import ShareState, ShareStatus, StatsSnapshot, WorkerControl
from services.worker.inputs import InputReader, InputStream
from services.worker.tracked import TrackedRequest
from services.worker.metrics import WorkerMetrics
from services.worker.publisher import PipelinePublisher
from services.worker import reconnect
from services.worker.recovery import (SCAN_INTERVAL_S, heartbeat_value, queue_heartbeat, read_progress,
                                      take_over_dead)

if TYPE_CHECKING:          # succession.py drives a Worker through export_state/import_state; main sets it
    from services.worker.succession import Succession

log = logging.getLogger(__name__)

PREFILL_GROUP = "prefill"
DECODE_GROUP = "decode"
HOST_WINDOW = 64            # iterations over which the reported host time per iteration is a median
IDLE_REPORT_S = 2.0         # an idle worker rewrites its report this often (orchestrator/admin.py: STALE_REPORT_S 10)
BUSY_REPORT_S = 0.05        # a busy one at most this often (the orchestrator reads them every 250 ms), and
                            # whenever its batch changes


@dataclass
class Worker:
    """One worker's loop over its scheduler and model runner."""

    config: WorkerConfig
    scheduler: Scheduler
    runner: ModelRunner
    sampler: Sampler
    client: redis.Redis
    control: WorkerControl
    metrics: WorkerMetrics
    stack_cpus: tuple[int, ...] = ()     # every core the stack may use (the cpu backend's unit total)
    kv_memory: str = ""                  # the arena memory this worker maps (ArenaExport.memory_id; "" colocated)
    tracked: dict[str, TrackedRequest] = field(default_factory=dict)   # every request this worker holds
    succession: Succession | None = None   # retunes by succession (`--retune-mode succession`; set by main)
    green: GreenRetune | None = None       # retunes by green-context stream (`--retune-mode green`; set by main)
    switch_ms: tuple[float, float] = (0.0, 0.0)   # last share change: latency, pause (a succession that started
                                                  # this worker, or an in-place core change: all pause)
    stats: StatsSnapshot = field(default_factory=StatsSnapshot)
    last_report_at: float = 0.0          # time.monotonic() of the last WorkerReport written
    kv_blocks_free: int = 0              # the pool's free list length, read with each iteration's publish
    host_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HOST_WINDOW))
    keys: KeySpace = field(init=False)
    is_split_decode: bool = field(init=False)    # reads hand-offs instead of the prefill queue
    records_progress: bool = field(init=False)   # each token delivered is also kept in Redis until the request
                                                 # leaves (decode and colocated): a taker-over resumes after it
    input_stream: str = field(init=False)
    _input_type: type = field(init=False)        # what the input stream carries: Handoff or QueuedRequest
    group: str = field(init=False)
    publisher: PipelinePublisher = field(init=False)   # sends each iteration's pipeline, overlapped
    inputs: InputReader = field(init=False)            # cancels, new work, decode's growth (inputs.py)
    kv_order: KvWriteOrder = field(init=False)         # this worker's KV writes before others' reads (fence.py)
    _heartbeat: str = field(init=False)                    # recovery.py: how peers tell this worker alive
    _next_peer_scan: float = field(init=False, default=0.0)   # time.monotonic() of the next dead-peer scan
    _reported_batch: tuple[int, int] = field(init=False, default=(-1, -1))   # running, waiting in the last report
    outage: Outage = field(init=False)                 # Redis away: one log line when it goes, one when back
    epoch: DataEpoch = field(init=False)               # tells a Redis that came back empty (reconnect.py)

    def __post_init__(self) -> None:
        self.keys = KeySpace(self.config.key_prefix)
        self.is_split_decode = self.config.phase is Phase.DECODE
        self.records_progress = self.config.phase is not Phase.PREFILL
        self.input_stream = self.keys.decode_admit if self.is_split_decode else self.keys.prefill_queue
        self._input_type = Handoff if self.is_split_decode else QueuedRequest
        self.group = DECODE_GROUP if self.is_split_decode else PREFILL_GROUP
        ensure_group(self.client, self.input_stream, self.group)
        self._heartbeat = heartbeat_value()
        self.outage = Outage(log, "this worker lets go of its requests and takes them up again from Redis "
                                  "once it is back")
        self.epoch = DataEpoch(self.keys.epoch)
        self.epoch.rejoin(self.client)
        pipe = self.client.pipeline(transaction=False)
        queue_heartbeat(pipe, self.keys.worker_alive(self.config.worker_id), self._heartbeat)
        pipe.execute()            # alive before it owns any entry, so no peer takes its work over
        self.kv_blocks_free = self.scheduler.blocks.num_free
        pool = self.runner.kv_cache if self.runner is not None else None     # None: a worker without a model
        self.kv_order = KvWriteOrder.for_worker(pool, publishes_handoffs=self.config.phase is Phase.PREFILL)
        self.publisher = PipelinePublisher(self._on_published, name=f"{self.config.phase.value}-publisher",
                                           threaded=self.config.overlap_publish)
        self.inputs = InputReader(
            self.client, self.keys, InputStream(self.input_stream, self.group, self.config.worker_id, self._input_type),
            self.scheduler, self.publisher, grows_decode=self.is_split_decode, overlapped=self.config.overlap_publish,
            idle_block_ms=self.config.idle_block_ms, name=self.config.phase.value)

    # ------------------------------------------------------------------ the loop
    def run_forever(self) -> None:
        while not self.control.stopping:
            try:
                self.run_once()
            except Exception as e:     # noqa: BLE001 - only Redis outages are handled; the rest re-raised
                if not reconnect.is_outage(e):
                    raise
                reconnect.resync(self, e)

    def run_once(self) -> None:
        iteration_start = time.perf_counter()
        if time.monotonic() >= self._next_peer_scan:
            self.recover_dead_peers()
        self._apply_requested_share()
        if self.succession is not None and self.succession.poll():   # a successor took over: this worker stops
            return
        if self._poll_inputs():
            iteration_start = time.perf_counter()   # it waited for work while idle: not host time
        if not self.scheduler.has_work():
            if time.monotonic() - self.last_report_at >= IDLE_REPORT_S:
                self.report()         # idle: still alive and listed (the orchestrator drops silent workers)
            return
        started = time.perf_counter()
        if self.scheduler.awaits_recent_keys():   # keys of the last iteration's pipeline found by this one's
            self.publisher.flush()                # admissions (n > 1: the copies reuse the first's prompt)
        batch = self.scheduler.schedule()                       # pure: which requests, which blocks
        self._requeue_preempted(batch)
        if batch.is_empty:
            self.control.wait_stopping(self.config.idle_block_ms / 1000)   # waiting for blocks to free up
            return
        self._mark_scheduled(batch)
        self.inputs.ask_growth_ahead()                          # sent while the forward pass runs
        logits = self.runner.run(batch)                         # torch: tensors from block ids, forward
        sampling_started = time.perf_counter()
        sampled = sample_batch(self.sampler, self.scheduler, batch, logits)
        self.kv_order.writes_done()       # cuda: this iteration's KV writes ordered before any hand-off naming them
        device_s = self.runner.last_forward_s + time.perf_counter() - sampling_started
        with self.scheduler.blocks.deferring_frees() as finished:   # their ids are never allocated again
            advanced = self.scheduler.postprocess(batch, sampled)
        elapsed = time.perf_counter() - started
        # One round trip for everything below, all or nothing (MULTI): a first token, its hand-off and
        # the ack of its queue entry land together, so a worker killed meanwhile leaves the request
        # pending for recovery.py, never half handed off.
        pipe = self.client.pipeline(transaction=True)
        self._publish(advanced, pipe)
        self.scheduler.blocks.queue_deferred(pipe, finished)   # keys of filled blocks, then the frees
        self._record(batch, elapsed, pipe)
        queue_free_count(pipe, self.keys)     # the free count for the next report, in this round trip
        self.publisher.submit(pipe)           # sent while the next iteration runs (publisher.py)
        self._observe_host_time(time.perf_counter() - iteration_start - device_s)

    def recover_dead_peers(self) -> None:
        """Take over the entries a dead worker of this group left pending (recovery.py). Also where
        a Redis that came back empty without this worker noticing is found (reconnect.py)."""
        self._next_peer_scan = time.monotonic() + SCAN_INTERVAL_S
        if self.epoch.rejoin(self.client):
            raise DataLost("redis holds another data set than the one this worker started with")
        self.take_over(take_over_dead(self.client, self.keys.worker_alive, self.input_stream, self.group,
                                      self.config.worker_id, self._input_type))

    def take_over_from(self, worker_id: str) -> None:
        """A retiring worker's pending entries (a succession), claimed and resumed as a dead peer's are,
        so a successor killed later leaves them pending for recovery.py in turn."""
        self.take_over(take_over_consumer(self.client, self.input_stream, self.group, self.config.worker_id,
                                          worker_id, self._input_type))

    def take_over(self, entries: list) -> None:
        """Entries pending with another worker of this group (dead, or retiring by succession), or with
        this one before Redis went away, admitted where the client streams stopped: prefill frees the
        blocks it had half filled and recomputes the prompt; colocated too, from the prompt and the
        tokens already delivered (its progress record), so the next token is drawn after the same
        ones; decode resumes in place (its KV is still in the arena's pool), from its tokens so far
        and its block table now, or, when the arena's memory is new since (`_kv_elsewhere`), hands
        it back to prefill with those tokens."""
        if not entries:
            return
        request_ids = [message.request_id for _, message in entries]
        progress = read_progress(self.client, self.keys, request_ids) if self.records_progress \
            else [()] * len(entries)          # split prefill records none: its one token leaves with the hand-off
        if not self.is_split_decode:
            self.scheduler.blocks.free_many(request_ids)
            for (entry_id, queued), tokens in zip(entries, progress):
                self._admit_queued(entry_id, replace(queued, output_token_ids=(*queued.output_token_ids, *tokens)))
            return
        for (entry_id, handoff), tokens in zip(entries, progress):
            self._admit_handoff(entry_id, handoff, tokens, self.scheduler.blocks.owned(handoff.request_id))

    def export_state(self, share: ShareState) -> SuccessionState:
        """Hand everything over to a successor at `share` (retune by succession, succession.py): tokens
        already produced sent first; what it holds left pending with its consumer for the successor to
        claim (decode: running requests with their KV in place; prefill: blocks freed, the prompts
        recomputed; decode's not yet running: back to prefill); the device synchronized; a share
        requested meanwhile passed on. This worker holds nothing after."""
        self.flush_published()       # tokens already produced reach the gateway before the successor's
        running, entry_ids, released = [], [], []
        for request_id, tracked in list(self.tracked.items()):
            if self.is_split_decode and tracked.seq.status is SequenceStatus.RUNNING:
                running.append(tracked.handoff(self.kv_memory))      # KV stays in its blocks, owned by the request
            elif not self.is_split_decode:                  # prefill: recomputed by the successor
                self.scheduler.blocks.free(request_id)
                entry_ids.append(tracked.entry_id)
            else:                                           # decode, not running: no KV to hand over
                self.scheduler.blocks.free(request_id)
                stream_entries.add(self.client, stream_entries.queued(self.keys, tracked.requeued()))
                released.append((tracked.entry_id, request_id))
        self.release_inputs([e for e, _ in released], [r for _, r in released])
        self.let_go()
        kv_fence(self.runner.kv_cache)                      # cuda: every write to the shared KV has landed
        queued = self.control.take_queued_share()
        return SuccessionState(
            self.config.worker_id, share.share, share.cpu_ids, share.token_budget, share.requested_at, time.time(),
            tuple(running), tuple(e for e in entry_ids if e),
            queued=RequestedShare(queued.share, queued.cpu_ids, queued.token_budget, queued.requested_at)
            if queued is not None else None)

    def import_state(self, state: SuccessionState) -> None:
        """Take over from a retiring worker (retune by succession): its pending entries claimed as a
        dead peer's are (decode: each request's tokens so far and its blocks read back from Redis),
        cancels published since honoured on admission, its share and budget in force, and a share
        requested of it during the succession left for this worker's first boundary."""
        self.cancels.poll(self.client)
        self.take_over_from(state.from_worker_id)
        for tracked in self.tracked.values():
            tracked.handoff_time = None                    # not a prefill hand-off: keep that metric clean
        if state.token_budget:
            self.scheduler.token_budget = state.token_budget
        applied = self.control.share_applied(ShareState(state.share, state.cpu_ids, state.token_budget), 0)
        self.metrics.compute_share.set(applied.share)
        if state.queued is not None:
            q = state.queued
            self.control.carry_over(ShareState(q.share, q.cpu_ids, q.token_budget, requested_at=q.requested_at))
        log.info("took over from %s: %d running requests, %d queue entries", state.from_worker_id,
                 len(state.running), len(state.pending_entry_ids))

    def let_go(self) -> int:
        """Forget every request this worker holds, changing nothing in Redis, where each is recorded
        (reconnect.py); -> how many it held."""
        held = len(self.tracked)
        self.scheduler.forget_all()
        self.tracked.clear()
        return held

    @property
    def input_type(self) -> type:
        """What the input stream carries: Handoff (split decode) or QueuedRequest."""
        return self._input_type

    @property
    def cancels(self) -> CancelWatcher:
        """The cancels this worker has seen (inputs.py reads them)."""
        return self.inputs.cancels

    def _on_published(self, replies: list) -> None:
        """On the publisher's thread: the pool's free count read by the pipeline's last command."""
        self.kv_blocks_free = free_count_from(replies)

    def flush_published(self) -> None:
        """Every queued pipeline sent (blocks asked for ahead adopted): what the loop writes next
        directly lands after it."""
        self.inputs.adopt_growth_ahead()
        self.publisher.flush()

    def _observe_host_time(self, seconds: float) -> None:
        """Everything an iteration spends outside the model's forward pass and the sampler (the
        device's work): Redis, scheduling, input tensors, publishing, metrics (issue 11's budget:
        < 2 ms at decode batch 32)."""
        self.metrics.iteration_host_seconds.observe(seconds)
        self.host_ms.append(seconds * 1000)

    # ------------------------------------------------------------------ inputs
    def _apply_requested_share(self) -> None:
        share = self.control.take_requested_share()     # None during a succession: a request waits behind it
        if share is None:
            return
        if self.succession is not None and self.succession.needed(share):
            self.succession.begin(share)     # a successor at the new share; this worker serves until it is ready
            return
        if self.green is not None:              # cuda: another green partition's stream, this process
            switch = self.green.apply(share.share)
            self.switch_ms = (switch.switch_ms, switch.switch_ms)
        elif share.cpu_ids:
            started = time.perf_counter()
            apply_cpu_share(share.cpu_ids)
            if share.cpu_ids != self.control.share.cpu_ids:   # moved in place: the orchestrator's switch cost
                moved_ms = (time.perf_counter() - started) * 1000
                self.switch_ms = (moved_ms, moved_ms)
        if share.token_budget:
            self.scheduler.token_budget = share.token_budget
        applied = self.control.share_applied(share, self.stats.iterations)
        self.metrics.compute_share.set(applied.share)
        self.probe_units()
        self.report()
        log.info("compute share now %.2f on cores %s (budget %s)", applied.share, applied.cpu_ids,
                 share.token_budget or "unchanged")

    def _poll_inputs(self) -> bool:
        """Cancels and new work (inputs.py): cancelled requests dropped (blocks freed), new entries
        admitted. True when it waited for work while idle."""
        room = 0 if self.control.draining else \
            self.config.max_num_seqs - len(self.scheduler.running) - len(self.scheduler.waiting)
        reads = self.inputs.poll(room)
        self._drop_cancelled(reads.cancelled)
        self._admit(reads.entries)
        return reads.blocked

    def _admit(self, entries: list) -> None:
        if not self.is_split_decode:
            for entry_id, queued in entries:
                self._admit_queued(entry_id, queued)
        else:      # a hand-off stays pending until its request leaves decode: one that dies leaves it to recovery.py
            for entry_id, handoff in entries:
                self._admit_handoff(entry_id, handoff)

    def _drop_cancelled(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            tracked = self.tracked.get(request_id)
            if tracked is None:
                continue
            self.scheduler.finish(request_id, FinishReason.CANCELLED)   # frees its blocks now
            self._forget(request_id)

    def _already_here(self, request_id: str, entry_id: str | None) -> bool:
        """A second request under an id this worker holds is dropped (acked, nothing else: its id,
        blocks and gateway stream are the first one's). The gateway's ids make it impossible
        (services/gateway/request_ids.py); a worker still never crashes on one."""
        if request_id not in self.tracked:
            return False
        log.warning("dropped a second request %s: one with this id is already here", request_id)
        self.release_inputs([entry_id], [])         # the first one's progress records stay
        return True

    def _admit_queued(self, entry_id: str, queued: QueuedRequest) -> None:
        if self._already_here(queued.request_id, entry_id):
            return
        if self.cancels.is_cancelled(queued.request_id):
            self.release_inputs([entry_id], [queued.request_id])
            return
        seq = Sequence(queued.request_id, list(queued.prompt_token_ids), queued.sampling,
                       arrival_time=queued.arrival_time, output_token_ids=list(queued.output_token_ids))
        try:
            self.scheduler.add(seq)
        except RequestTooLarge as e:
            self._send_now(queued.reply_to, TokenDelivery(queued.request_id, (), "error", str(e)))
            self.release_inputs([entry_id], [queued.request_id])
            return
        self.tracked[seq.request_id] = TrackedRequest(seq, queued.reply_to, entry_id,
                                                is_first_delivery=not queued.output_token_ids)

    def _admit_handoff(self, entry_id: str | None, handoff: Handoff, progress: tuple[int, ...] = (),
                       block_ids: list[int] | None = None) -> None:
        """Decode takes a request over with its KV in place. `entry_id` None: handed over by a retiring
        decode worker. `progress`, `block_ids`: a dead decode's tokens since the hand-off and its
        block table now (recovery), so the request resumes where the client's stream stopped."""
        if self._already_here(handoff.request_id, entry_id):
            return
        if self.cancels.is_cancelled(handoff.request_id):
            self.scheduler.blocks.free(handoff.request_id)
            self.release_inputs([entry_id], [handoff.request_id])
            return
        computed = handoff.num_computed_tokens + len(progress)
        if self._kv_elsewhere(handoff):
            self._back_to_prefill(entry_id, handoff, progress, "its KV was in the arena's memory before the "
                                  "arena restarted with new memory")
            return
        if block_ids is not None and len(block_ids) < blocks_for_tokens(computed, self.scheduler.config.block_size):
            self._back_to_prefill(entry_id, handoff, progress, "it has lost its KV blocks")
            return
        self.kv_order.before_reads(handoff.kv_ready_event)   # cuda: reads queued after prefill's writes
        seq = Sequence(handoff.request_id, list(handoff.prompt_token_ids), handoff.sampling,
                       arrival_time=handoff.arrival_time,
                       output_token_ids=[*handoff.output_token_ids, *progress],
                       num_computed_tokens=handoff.num_computed_tokens + len(progress),
                       block_ids=list(handoff.block_ids if block_ids is None else block_ids))
        self.scheduler.admit_prefilled(seq)
        self.tracked[seq.request_id] = TrackedRequest(seq, handoff.reply_to, entry_id, is_first_delivery=False,
                                                handoff_time=None if progress else handoff.handoff_time)

    def _kv_elsewhere(self, handoff: Handoff) -> bool:
        """Whether the hand-off's KV was written to other memory than this worker maps: the arena
        restarted with new memory (always on CUDA; on the CPU when it could not re-open its
        segments), so its blocks hold nothing of the request. Unknown ("") on either side: trusted."""
        return bool(handoff.kv_memory and self.kv_memory and handoff.kv_memory != self.kv_memory)

    def _back_to_prefill(self, entry_id: str | None, handoff: Handoff, progress: tuple[int, ...], why: str) -> None:
        """A request taken over without its KV: the blocks it was in were freed (a preemption, its
        re-queue in doubt when the worker died or lost Redis), or are in memory that is gone (a new
        arena). Prefill recomputes it with its tokens so far, as it does a preempted one; its blocks
        are freed (whatever they hold is not its KV) and it is re-queued and released together."""
        log.warning("request %s sent back to prefill to be recomputed: %s", handoff.request_id, why)
        pipe = self.client.pipeline(transaction=True)
        stream_entries.add(pipe, stream_entries.queued(self.keys, QueuedRequest(
            handoff.request_id, tuple(handoff.prompt_token_ids), handoff.sampling, handoff.reply_to,
            handoff.arrival_time, (*handoff.output_token_ids, *progress))))
        self.scheduler.blocks.queue_free_many(pipe, [handoff.request_id])
        self._queue_release(pipe, [entry_id], [handoff.request_id])
        pipe.execute()

    def _requeue_preempted(self, batch: SchedulerOutput) -> None:
        """Decode: a preempted request goes back to prefill with its tokens, to be recomputed."""
        if not batch.preempted_ids:
            return
        self.metrics.num_preemptions.inc(len(batch.preempted_ids))
        self.stats = _bump(self.stats, preemptions=len(batch.preempted_ids))
        if not self.is_split_decode:
            return      # hybrid and prefill schedulers keep preempted requests in their own queue
        self.flush_published()    # their tokens so far reach the gateway before prefill resumes them
        pipe = self.client.pipeline(transaction=True)          # re-queued and released together
        entry_ids = []
        for request_id in batch.preempted_ids:
            tracked = self.tracked.pop(request_id)
            stream_entries.add(pipe, stream_entries.queued(self.keys, tracked.requeued()))
            entry_ids.append(tracked.entry_id)
        self._queue_release(pipe, entry_ids, batch.preempted_ids)
        pipe.execute()

    def _mark_scheduled(self, batch: SchedulerOutput) -> None:
        now = time.time()
        for chunk in batch.prefill_chunks:
            tracked = self.tracked[chunk.request_id]
            if tracked.first_scheduled is None:
                tracked.first_scheduled = now
        for chunk in batch.decode_chunks:
            tracked = self.tracked[chunk.request_id]
            if tracked.handoff_time is not None:
                self.metrics.handoff_latency_seconds.observe(max(0.0, now - tracked.handoff_time))
                tracked.handoff_time = None

    # ------------------------------------------------------------------ outputs
    def _publish(self, advanced: list[Sequence], pipe: redis.client.Pipeline) -> None:
        """Deliver new tokens (one entry per gateway), then hand off finished prefills (a first token
        is published before decode can see its request); ack (and drop) what left this worker."""
        to_ack: list[str | None] = []
        gone: list[str] = []
        handoffs: list[Handoff] = []
        by_gateway: dict[str, list[TokenDelivery]] = {}
        for seq in advanced:
            tracked = self.tracked[seq.request_id]
            finish = seq.finish_reason.value if seq.status is SequenceStatus.FINISHED else None
            by_gateway.setdefault(tracked.reply_to, []).append(tracked.delivery(finish))
            if seq.status is SequenceStatus.HANDED_OFF:
                handoffs.append(tracked.handoff(self.kv_memory, self.kv_order.handle))
            if seq.status in (SequenceStatus.HANDED_OFF, SequenceStatus.FINISHED):
                to_ack.append(tracked.entry_id)
                gone.append(seq.request_id)
                del self.tracked[seq.request_id]
                self.stats = _bump(self.stats, requests_finished=1)
            elif self.records_progress:      # what a worker that dies now resumes from (take_over)
                pipe.rpush(self.keys.decode_progress(seq.request_id), seq.output_token_ids[-1])
        for reply_to, deliveries in by_gateway.items():
            stream_entries.add(pipe, stream_entries.deliveries(reply_to, deliveries))
        for handoff in handoffs:
            stream_entries.add(pipe, stream_entries.handoff(self.keys, handoff))
        self._queue_release(pipe, to_ack, gone)

    def _send_now(self, stream: str, delivery: TokenDelivery) -> None:
        stream_entries.add(self.client, stream_entries.deliveries(stream, (delivery,)))

    def _forget(self, request_id: str) -> None:
        tracked = self.tracked.pop(request_id, None)
        if tracked is not None:
            self.release_inputs([tracked.entry_id], [request_id])

    def release_inputs(self, entry_ids: list[str | None], request_ids: list[str]) -> None:
        """These requests left this worker (their blocks already freed or passed on): their input
        entries (None: a request that came without one) acked and deleted, so the stream holds only
        live work, and decode's progress records dropped; one round trip."""
        pipe = self.client.pipeline(transaction=True)
        self._queue_release(pipe, entry_ids, request_ids)
        if len(pipe):
            pipe.execute()

    def _queue_release(self, pipe: redis.client.Pipeline, entry_ids: list[str | None], request_ids) -> None:
        entry_ids = [e for e in entry_ids if e]
        if entry_ids:
            pipe.xack(self.input_stream, self.group, *entry_ids)
            pipe.xdel(self.input_stream, *entry_ids)
        if self.records_progress and request_ids:
            pipe.delete(*(self.keys.decode_progress(r) for r in request_ids))

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, batch: SchedulerOutput, elapsed: float, pipe: redis.client.Pipeline) -> None:
        num_prefill = batch.num_prefill_tokens
        num_decode = len(batch.decode_chunks)
        blocks = self.scheduler.blocks
        free = self.kv_blocks_free         # as of the previous iteration's round trip: no extra one here
        share = self.control.share
        stream_entries.add(pipe, stream_entries.timing(self.keys, IterationSample(
            self.config.phase.value, share.share, self._num_units(share), num_prefill, num_decode,
            len(batch.chunks), sum(c.context_len for c in batch.decode_chunks),
            sum(len(c.token_ids) * c.context_len for c in batch.prefill_chunks), elapsed * 1000, time.time())))
        self.metrics.iteration_seconds.observe(elapsed)
        self.metrics.prompt_tokens.inc(num_prefill)
        self.metrics.generation_tokens.inc(num_decode + sum(c.is_sampled for c in batch.prefill_chunks))
        # num_requests_running/waiting and kv_cache_usage_perc are read at each scrape (WorkerMetrics.read_when_scraped)
        self.stats = _bump(self.stats, iterations=1, tokens_processed=num_prefill + num_decode)
        self.stats = StatsSnapshot(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            iterations=self.stats.iterations, tokens_processed=self.stats.tokens_processed,
            requests_finished=self.stats.requests_finished, preemptions=self.stats.preemptions,
            last_iteration_ms=elapsed * 1000, last_batch_tokens=num_prefill + num_decode,
            kv_blocks_free=free, kv_blocks_total=blocks.num_blocks)
        self.control.publish_stats(self.stats)
        if (time.monotonic() - self.last_report_at >= BUSY_REPORT_S
                or (self.stats.num_running, self.stats.num_waiting) != self._reported_batch):
            self.report(pipe)

    def _num_units(self, share: ShareState) -> int:
        """The units an iteration ran on, for the model: cores (cpu); SMs (cuda: as the probe measured
        them, else as requested; 0 lets the orchestrator derive them from the share)."""
        if self.config.device != "cuda":
            return len(share.cpu_ids)
        units = self.control.units
        return units.used if units is not None and units.used > 0 else share.num_units

    def probe_units(self) -> None:
        """Measure what the share in force gives this worker (SMs on CUDA, cores on the CPU)."""
        if self.green is not None and self.green.current_sms:     # known: the probe would run outside the green stream
            units = ComputeUnits("sm", self.green.current_sms, self.green.space.num_units)
        else:
            units = probe_compute_units(str(self.runner.kv_cache.device), self.control.share.cpu_ids, self.stack_cpus)
        if units.error:
            log.warning("%s units unknown: %s", units.kind, units.error)
        self.control.publish_units(units)

    def report(self, pipe: redis.client.Pipeline | None = None) -> None:
        """Overwrite this worker's WorkerReport in Redis (the orchestrator's view of it)."""
        (share, status, changed_at), s, units = self.control.wanted, self.stats, self.control.units
        cache = self.scheduler.config
        report = WorkerReport(self.config.phase.value, self.config.worker_id, f"127.0.0.1:{self.config.port}",
                              share.share, share.cpu_ids, share.token_budget, s.num_running, s.num_waiting,
                              s.iterations, s.kv_blocks_free, s.kv_blocks_total, time.time(),
                              context_tokens=sum(seq.num_tokens for seq in self.scheduler.running),
                              units_kind=units.kind if units else "", units_used=units.used if units else 0,
                              units_total=units.total if units else 0, pid=os.getpid(),
                              share_switch_ms=self.switch_ms[0], share_switch_stall_ms=self.switch_ms[1],
                              host_ms=statistics.median(self.host_ms) if self.host_ms else 0.0,
                              share_pending=status is not ShareStatus.APPLIED, share_changed_at=changed_at,
                              draining=self.control.draining,
                              prefix_caching=cache.prefix_caching, cache_salt=cache.cache_salt,
                              prefix_query_tokens=self.scheduler.prefix_query_tokens,
                              prefix_hit_tokens=self.scheduler.prefix_hit_tokens)
        target = pipe or self.client.pipeline(transaction=False)
        target.hset(self.keys.worker_stats(self.config.phase.value), mapping=stream_entries.report_mapping(report))
        queue_heartbeat(target, self.keys.worker_alive(self.config.worker_id), self._heartbeat)
        if pipe is None:
            target.execute()
        self.last_report_at = time.monotonic()
        self._reported_batch = (s.num_running, s.num_waiting)

    def cancel_all(self, reason: str) -> None:
        """On shutdown: end every request this worker holds, telling its gateway."""
        self.publisher.close()    # their last tokens first
        self.inputs.close()
        for request_id, tracked in list(self.tracked.items()):
            self.scheduler.finish(request_id, FinishReason.ERROR)
            self._send_now(tracked.reply_to, TokenDelivery(request_id, (), "error", reason))
            self._forget(request_id)


def _bump(stats: StatsSnapshot, **deltas: int) -> StatsSnapshot:
    return replace(stats, **{k: getattr(stats, k) + v for k, v in deltas.items()})
