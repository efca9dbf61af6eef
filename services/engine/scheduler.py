"""Which requests run in the next iteration, and with which KV blocks.

Pure Python (no torch): the same scheduler drives the offline engine, the colocated
chunked-prefill baseline, the prefill worker and the decode worker; they differ only in `mode`.

  hybrid   decode every running request (one token each), then fill what is left of the token
           budget with prompt chunks, at most `chunk_size` prompt tokens per iteration
           (vLLM/SGLang chunked prefill: the colocated baseline).
  prefill  prompt chunks only; when a prompt is done and its first token sampled the request is
           HANDED_OFF: it leaves this scheduler and its blocks go with it to decode.
  decode   decode only; requests arrive with their KV already written (`admit_prefilled`).

Blocks: a request admitted for prefill gets all its prompt blocks at once, so chunks never stall
half-way; decode grows a request one block at a time. With `prefix_caching`, admission reuses the
blocks of the longest cached run of the prompt's leading full blocks (`BlockAllocator.allocate_cached`)
and only the rest is computed; a request's full blocks are keyed when a prefill chunk ends, and
when it is preempted or finishes, so later requests (and its own recompute) find them. A waiting
request whose leading blocks a running request is computing now (`n > 1`: the copies of one prompt;
one new system prompt sent twice at once) waits until they are keyed, then reuses them, rather than
computing them a second time beside it (later requests may pass it meanwhile). When a decode cannot
grow, the newest running request is preempted: its blocks are freed and it is recomputed later
(hybrid) or handed back to the caller to re-queue (decode).
"""
from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from services.engine.blocks import BlockAllocator, OutOfBlocks, blocks_for_tokens
from services.engine.prefix_hash import block_keys, num_reusable_blocks, reusable_keys, shared_full_blocks
from services.engine.sequence import FinishReason, Sequence, SequenceStatus


class SchedulerMode(enum.Enum):
    HYBRID = "hybrid"
    PREFILL = "prefill"
    DECODE = "decode"


class RequestTooLarge(ValueError):
    """A request can never be scheduled: its prompt exceeds the context or the whole KV pool."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits of one scheduler."""

    mode: SchedulerMode = SchedulerMode.HYBRID
    block_size: int = 16                 # tokens per KV block
    max_num_seqs: int = 128              # running requests at most
    max_num_batched_tokens: int = 2048   # tokens fed per iteration, prefill and decode together
    chunk_size: int = 2048               # prompt tokens per iteration at most (hybrid and prefill)
    max_model_len: int = 8192            # prompt + completion tokens per request
    eos_token_ids: tuple[int, ...] = ()  # end a request unless it asked for ignore_eos
    prefix_caching: bool = False         # reuse cached full blocks of a prompt's prefix (vLLM's APC)
    cache_salt: str = ""                 # part of every block key: the KV memory's identity (prefix_hash)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "chunk_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens of one request fed in one iteration."""

    request_id: str
    token_ids: tuple[int, ...]     # the tokens to feed, in order
    start_position: int            # position of token_ids[0] in the request (its num_computed_tokens)
    block_ids: tuple[int, ...]     # the request's whole block table
    is_sampled: bool               # the chunk reaches the last known token: sample the next one

    @property
    def context_len(self) -> int:
        """Tokens in the cache once this chunk is written."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """The contract between the scheduler and the model runner for one iteration."""

    prefill_chunks: tuple[ScheduledChunk, ...]    # prompt (or recompute) chunks, fed first
    decode_chunks: tuple[ScheduledChunk, ...]     # one token each
    preempted_ids: tuple[str, ...] = ()           # requests whose KV was dropped this iteration

    @property
    def chunks(self) -> tuple[ScheduledChunk, ...]:
        return self.prefill_chunks + self.decode_chunks

    @property
    def num_prefill_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.prefill_chunks)

    @property
    def is_empty(self) -> bool:
        return not self.prefill_chunks and not self.decode_chunks


@dataclass
class Scheduler:
    """FCFS scheduler over one block allocator."""

    config: SchedulerConfig
    blocks: BlockAllocator
    waiting: collections.deque[Sequence] = field(default_factory=collections.deque)
    running: list[Sequence] = field(default_factory=list)   # in admission order; newest last
    token_budget: int | None = None                          # set by the orchestrator; None = config
    prefix_query_tokens: int = 0                             # tokens of admissions that looked up the cache
    prefix_hit_tokens: int = 0                               # of those, found cached (vLLM's queries / hits)
    recent_keys: set[str] = field(default_factory=set)       # keyed since the last schedule (awaits_recent_keys)

    def add(self, seq: Sequence) -> None:
        """Queue a new request for prefill. Raises RequestTooLarge if it could never run."""
        self.check_fits(len(seq.prompt_token_ids))
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def check_fits(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens >= self.config.max_model_len:
            raise RequestTooLarge(
                f"prompt has {num_prompt_tokens} tokens; the context holds {self.config.max_model_len} "
                "including at least one generated token")
        if blocks_for_tokens(num_prompt_tokens + 1, self.config.block_size) > self.blocks.num_blocks:
            raise RequestTooLarge(
                f"prompt has {num_prompt_tokens} tokens; the KV pool holds "
                f"{self.blocks.num_blocks * self.config.block_size} tokens in all")

    def admit_prefilled(self, seq: Sequence) -> None:
        """Decode mode: take a request whose prompt KV is already in its blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        return next((s for s in self.waiting if s.request_id == request_id), None)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget or self.config.max_num_batched_tokens
        self.recent_keys.clear()
        preempted: list[str] = []
        decodes: list[ScheduledChunk] = []
        if self.config.mode is not SchedulerMode.PREFILL:
            decodes = self._schedule_decodes(preempted)
        prefills: list[ScheduledChunk] = []
        if self.config.mode is not SchedulerMode.DECODE:
            prefill_budget = min(self.config.chunk_size, budget - len(decodes))
            prefills = self._schedule_prefills(prefill_budget)
        return SchedulerOutput(tuple(prefills), tuple(decodes), tuple(preempted))

    def _schedule_decodes(self, preempted: list[str]) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        decoding = self._decode_rows()
        self._grow_all(decoding)
        for seq in decoding:
            if seq not in self.running:
                continue     # preempted to make room for an older request this iteration
            if not self._grow_for_decode(seq, preempted):
                break    # seq itself was preempted: nothing newer is left to run
            chunks.append(self._chunk(seq, 1))
        return chunks

    def _grow_all(self, seqs: list[Sequence]) -> None:
        """The blocks every decode row needs for its next token, in one allocator call (FCFS order).
        Rows it could not grant (the pool ran short, or another process took the blocks first) go
        through `_grow_for_decode`, which preempts."""
        needs = self._growth(seqs)
        if not needs:
            return
        granted = self.blocks.allocate_many([(seq.request_id, n) for seq, n in needs])
        for seq, _ in needs:
            seq.block_ids.extend(granted.get(seq.request_id, ()))

    def _decode_rows(self) -> list[Sequence]:
        """The running requests that decode this iteration, oldest first, within the token budget."""
        budget = self.token_budget or self.config.max_num_batched_tokens
        return [s for s in self.running if s.status is SequenceStatus.RUNNING and not s.is_prefilling][:budget]

    def _growth(self, seqs: list[Sequence], steps_ahead: int = 0) -> list[tuple[Sequence, int]]:
        needs = ((seq, self._blocks_needed(seq, steps_ahead)) for seq in seqs)
        return [(seq, n) for seq, n in needs if n > 0]

    def upcoming_decode_growth(self, steps_ahead: int = 0) -> list[tuple[str, int]]:
        """(request id, blocks) the decode rows running now will need for their next token, FCFS: what
        `_grow_all` would ask the allocator for at the next `schedule`, to ask for it ahead. With
        `steps_ahead` 1, called between `schedule` and `postprocess`: for the token after the one
        this iteration computes (the worker asks during the forward pass)."""
        return [(seq.request_id, n) for seq, n in self._growth(self._decode_rows(), steps_ahead)]

    def adopt_blocks(self, granted: dict[str, list[int]]) -> list[str]:
        """Blocks granted ahead to running requests join their tables; -> ids no longer running
        (whose grants the caller frees)."""
        by_id = {seq.request_id: seq for seq in self.running}
        gone = []
        for request_id, ids in granted.items():
            seq = by_id.get(request_id)
            if seq is None:
                gone.append(request_id)
            else:
                seq.block_ids.extend(ids)
        return gone

    def _blocks_needed(self, seq: Sequence, steps_ahead: int = 0) -> int:
        return blocks_for_tokens(seq.num_computed_tokens + 1 + steps_ahead, self.config.block_size) - len(seq.block_ids)

    def _grow_for_decode(self, seq: Sequence, preempted: list[str]) -> bool:
        """Make room for one more token of `seq`, preempting the newest requests if needed."""
        needed = self._blocks_needed(seq)
        while needed > 0 and not self.blocks.can_allocate(needed):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        if needed > 0:
            seq.block_ids.extend(self.blocks.allocate(seq.request_id, needed))
        return True

    def _schedule_prefills(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        for seq in self.running:    # requests already part-way through their prompt
            if budget <= 0:
                return chunks
            if seq.status is SequenceStatus.RUNNING and seq.is_prefilling:
                chunk = self._chunk(seq, min(seq.num_uncomputed_tokens, budget))
                budget -= len(chunk.token_ids)
                chunks.append(chunk)
        held = 0     # waiting requests passed over: a running request is computing blocks they will reuse
        while len(self.waiting) > held and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[held]
            if self._awaits_shared_blocks(seq):
                held += 1
                continue
            # All prompt blocks at once (plus room for the first sampled token), so no chunk stalls.
            needed = blocks_for_tokens(seq.num_tokens + 1, self.config.block_size) - len(seq.block_ids)
            if needed > self.blocks.num_blocks:
                # Grew (before a preemption) past what the whole pool holds: it can never run again.
                self.finish(seq.request_id, FinishReason.LENGTH)
                continue
            if not self._allocate_prompt(seq, needed):
                break    # FCFS: later requests wait too rather than overtake
            del self.waiting[held]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = self._chunk(seq, min(seq.num_uncomputed_tokens, budget))
            budget -= len(chunk.token_ids)
            chunks.append(chunk)
        return chunks

    def _allocate_prompt(self, seq: Sequence, needed: int) -> bool:
        """Blocks for a prompt (or a recompute); False when they do not fit now. With prefix caching a
        request that holds no blocks starts its table from the cached run of its leading blocks, and
        those tokens count as computed (the chunk starts after them)."""
        if not (self.config.prefix_caching and not seq.block_ids):
            if not self.blocks.can_allocate(needed):
                return False
            seq.block_ids.extend(self.blocks.allocate(seq.request_id, needed))
            return True
        keys = self._lookup_keys(seq)
        try:
            grant = self.blocks.allocate_cached(seq.request_id, keys, needed)
        except OutOfBlocks:
            return False
        cached = grant.num_cached * self.config.block_size
        seq.block_ids, seq.block_keys, seq.num_computed_tokens = grant.block_ids, keys[:grant.num_cached], cached
        if seq.num_preemptions == 0 and not seq.output_token_ids:
            seq.num_cached_tokens = cached
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += cached
        return True

    def _lookup_keys(self, seq: Sequence) -> list[str]:
        """The keys a request with no blocks looks up (made once per token count: it may wait a while)."""
        if seq.lookup_keys[0] != seq.num_tokens:
            tokens = seq.token_slice(0, seq.num_tokens)
            seq.lookup_keys = (seq.num_tokens, reusable_keys(tokens, self.config.block_size, self.config.cache_salt))
        return seq.lookup_keys[1]

    def _awaits_shared_blocks(self, seq: Sequence) -> bool:
        """Whether a running request is still computing leading blocks `seq` could reuse: then `seq`
        waits until they are keyed. (vLLM keys blocks before their KV is written to get the same in one
        iteration; here a key is only ever written for KV in place, whatever kill comes meanwhile.)"""
        if not self.config.prefix_caching or seq.block_ids:
            return False
        size, tokens = self.config.block_size, None
        limit = num_reusable_blocks(seq.num_tokens, size)
        for other in self.running:
            if other.status is SequenceStatus.RUNNING and other.is_prefilling and other.num_computed_tokens < limit * size:
                tokens = tokens if tokens is not None else seq.token_slice(0, seq.num_tokens)
                if shared_full_blocks(tokens, other.token_slice(0, other.num_tokens), size, limit) * size \
                        > other.num_computed_tokens:
                    return True
        return False

    def awaits_recent_keys(self) -> bool:
        """Whether a request the next `schedule` may admit looks up a block keyed since the last one: an
        allocator that sends keys later (the stack's, in the iteration's publish pipeline) sends them
        first, or the request misses them (the copies of an `n > 1` request, waiting for the first's)."""
        if not (self.config.prefix_caching and self.recent_keys):
            return False
        budget = self.token_budget or self.config.max_num_batched_tokens
        for seq in itertools.islice(self.waiting, max(0, self.config.max_num_seqs - len(self.running))):
            if budget <= 0:
                break
            if not seq.block_ids and not self.recent_keys.isdisjoint(self._lookup_keys(seq)):
                return True
            budget -= seq.num_uncomputed_tokens
        return False

    def cache_full_blocks(self, seq: Sequence) -> int:
        """Key the request's full blocks whose KV is written and not keyed yet; -> how many became
        reusable. A no-op without prefix caching."""
        size = self.config.block_size
        full = min(seq.num_computed_tokens // size, len(seq.block_ids))
        start = len(seq.block_keys)
        if not self.config.prefix_caching or full <= start:
            return 0
        parent = seq.block_keys[-1] if seq.block_keys else ""
        new = block_keys(seq.token_slice(0, full * size), size, self.config.cache_salt, parent=parent, start_block=start)
        seq.block_keys.extend(new)
        self.recent_keys.update(new)
        return self.blocks.cache_blocks(seq.request_id, [(start + i, key) for i, key in enumerate(new)])

    def _chunk(self, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(
            request_id=seq.request_id,
            token_ids=tuple(seq.token_slice(start, start + num_tokens)),
            start_position=start,
            block_ids=tuple(seq.block_ids),
            is_sampled=start + num_tokens == seq.num_tokens,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache_full_blocks(seq)          # its recompute (or another request) may find them again
        self.blocks.free(seq.request_id)
        seq.block_ids.clear()
        seq.block_keys.clear()
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        if self.config.mode is SchedulerMode.HYBRID:
            self.waiting.appendleft(seq)     # recompute first: it has waited longest

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[Sequence]:
        """Advance every scheduled request; append sampled tokens; finish or hand off.

        Returns the requests that got a new token this iteration, with their status updated.
        """
        advanced: list[Sequence] = []
        for chunk in output.chunks:
            seq = self.get(chunk.request_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue    # finished (cancelled, stop string) while the iteration ran
            seq.num_computed_tokens = chunk.context_len
            if len(chunk.token_ids) > 1 or seq.is_prefilling:
                self.cache_full_blocks(seq)  # a prompt chunk's full blocks: reusable from now on
            if not chunk.is_sampled:
                continue
            seq.output_token_ids.append(sampled[chunk.request_id])
            advanced.append(seq)
            reason = self._finish_reason(seq)
            if reason is not None:
                self.finish(seq.request_id, reason)
            elif self.config.mode is SchedulerMode.PREFILL:
                self.running.remove(seq)
                seq.status = SequenceStatus.HANDED_OFF
        return advanced

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        token, params = seq.output_token_ids[-1], seq.params
        if (token in self.config.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """End a request wherever it is (cancel, stop string, error); its blocks come back at once."""
        seq = self.get(request_id)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if reason is not FinishReason.ERROR:
            self.cache_full_blocks(seq)      # prompt and output: a next turn resends them
        self.blocks.free(request_id)
        seq.block_ids.clear()
        seq.block_keys.clear()
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def finish_all(self, request_ids: Iterable[str], reason: FinishReason) -> None:
        for request_id in request_ids:
            self.finish(request_id, reason)

    def forget_all(self) -> list[Sequence]:
        """Drop every request without touching its blocks: their record in the allocator is what a
        worker that lost its connection to Redis takes them up again from (services/worker/reconnect.py)."""
        seqs = [*self.running, *self.waiting]
        self.running.clear()
        self.waiting.clear()
        return seqs
