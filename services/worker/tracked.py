"""What a worker keeps about each request it holds, beside the scheduler's Sequence, and the
messages it builds from that: the TokenDelivery of its newest token, its Handoff to decode, and the
QueuedRequest that sends it back to prefill (preempted, or handed back)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.contracts import Handoff, QueuedRequest, TokenDelivery
from services.engine.sequence import Sequence


@dataclass
class TrackedRequest:
    seq: Sequence
    reply_to: str                      # the gateway's reply stream
    entry_id: str | None = None        # input entry, pending until the request leaves this worker
    is_first_delivery: bool = True     # carry queue time on the first tokens this worker sends
    first_scheduled: float | None = None   # wall clock of its first chunk here
    handoff_time: float | None = None  # decode: when prefill published the hand-off

    def delivery(self, finish: str | None) -> TokenDelivery:
        """Its newest token (and that token's logprob, which sample_batch appended if it asked)."""
        queue_ms, cached = None, None
        if self.is_first_delivery:
            cached = self.seq.num_cached_tokens
            self.is_first_delivery = False
            start = self.first_scheduled or time.time()
            queue_ms = max(0.0, (start - self.seq.arrival_time) * 1000)
        seq = self.seq
        logprobs = (seq.logprobs[-1],) if seq.params.logprobs is not None and seq.logprobs else ()
        return TokenDelivery(seq.request_id, (seq.output_token_ids[-1],), finish, queue_time_ms=queue_ms,
                             cached_tokens=cached,
                             logprobs=logprobs, position=len(seq.output_token_ids) - 1)

    def handoff(self, kv_memory: str = "", kv_ready_event: str = "") -> Handoff:
        """Everything decode needs to go on from here; the KV stays in its blocks, in the arena memory
        `kv_memory` (ArenaExport.memory_id), written before the device event `kv_ready_event` (fence.py)."""
        seq = self.seq
        return Handoff(seq.request_id, tuple(seq.block_ids), tuple(seq.prompt_token_ids),
                       tuple(seq.output_token_ids), seq.num_computed_tokens, seq.params, self.reply_to,
                       seq.arrival_time, handoff_time=time.time(), kv_memory=kv_memory,
                       kv_ready_event=kv_ready_event)

    def requeued(self) -> QueuedRequest:
        """It as prefill's work again, with every token it has so far: prefill recomputes their KV
        (its blocks were freed) and goes on from the last one."""
        seq = self.seq
        return QueuedRequest(seq.request_id, tuple(seq.prompt_token_ids), seq.params, self.reply_to,
                             seq.arrival_time, tuple(seq.output_token_ids))
