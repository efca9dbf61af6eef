"""The gateway's core: validate, tokenize, enqueue, and turn token deliveries into text chunks.

A request's life in the gateway:
  accepted     fields checked and bounded before any work (InvalidInput names the field),
               prompt tokenized (chat template for messages), checked against the context and
               the KV pool; a full prefill queue refuses it (QueueFull)
  queued       a QueuedRequest on the prefill stream, replies to this gateway's reply stream
  streaming    each TokenDelivery is detokenized incrementally (never splitting a character);
               stop strings are matched here, and a hit sends a CancelNotice so the workers stop
  finished     last chunk with finish reason and usage (prompt/completion tokens, queue, TTFT, e2e)
  cancelled    the client went away or its deadline passed: a CancelNotice frees its blocks; counted
               as finished with reason "abort" (an error on the way: "error"), as vLLM counts them
While Redis does not answer (redis_watch.py) new requests are refused with UNAVAILABLE and streams in
flight wait for their next token; a cancel, or a request id's release, that could not be written is
written once it is back.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis

from services.common import stream_entries
from services.common.contracts import (CancelNotice, KeySpace, QueuedRequest, RequestLatency, TokenDelivery,
                                       TokenLogprob)
from services.common.model_info import ModelInfo, parse_model_info
from services.common.redis_retry import CONNECTION_ERRORS, UNREACHABLE, Backoff
from services.engine.blocks import blocks_for_tokens
from services.engine.output import OutputState
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway import request_ids
from services.gateway.errors import InvalidInput, NotReady, QueueFull
from services.gateway.metrics import GatewayMetrics

log = logging.getLogger("duoserve.gateway")

UNSENT_MAX = 10_000                 # writes kept while Redis is away (the oldest dropped beyond)


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """A Generate call after conversion from protobuf: exactly one of the three inputs is set."""

    request_id: str                                   # "" asks the gateway to assign one
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content) pairs
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time_ms: float
    ttft_ms: float
    e2e_ms: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of a completion."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when sampling.logprobs is set


@dataclass
class _Timing:
    arrival: float                       # time.time() when accepted
    is_running: bool = False             # prefill has started it (first delivery seen)
    queue_time_ms: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0                  # completion tokens received so far


@dataclass
class Frontend:
    config: GatewayConfig
    client: aioredis.Redis
    metrics: GatewayMetrics
    keys: KeySpace = field(init=False)
    info: ModelInfo | None = None
    tokenizer: Tokenizer | None = None
    pending: dict[str, asyncio.Queue] = field(default_factory=dict)   # request id -> its deliveries
    redis_ok: bool = True                # set by redis_watch.RedisWatch: False refuses new requests
    redis_suspected: asyncio.Event = field(default_factory=asyncio.Event)   # a command failed: probe now
    unsent: list[Callable[[], Awaitable[object]]] = field(default_factory=list)   # written when Redis is back

    def __post_init__(self) -> None:
        self.keys = KeySpace(self.config.key_prefix)
        self.reply_stream = self.keys.reply(self.config.gateway_id)

    # ------------------------------------------------------------------ start-up
    async def wait_for_model(self) -> None:
        """Block until the stack has published its model; load the tokenizer from it."""
        deadline = time.monotonic() + self.config.model_wait_s
        while (raw := await self._model_info_now()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model published under {self.keys.model_info} after "
                                   f"{self.config.model_wait_s:.0f} s; is the arena (or colocated worker) up?")
            await asyncio.sleep(0.2)
        info = parse_model_info(raw)
        self.tokenizer = await asyncio.to_thread(Tokenizer.from_dir, info.model_dir)
        self.metrics.bind_model(info.name)
        self.info = info
        log.info("serving %s (%s mode, context %d, %d KV blocks)", info.name, info.mode, info.max_model_len,
                 info.num_kv_blocks)

    async def _model_info_now(self) -> bytes | None:
        try:
            return await self.client.hget(self.keys.model_info, "json")
        except CONNECTION_ERRORS:
            return None           # Redis not up yet (or restarting): asked again until the deadline

    async def read_replies(self) -> None:
        """Dispatch this gateway's reply stream to the waiting requests, forever. While Redis is
        away it asks again with backoff (quietly: redis_watch.py says it once); the cursor stays, and
        the stream is in Redis's append-only file, so no delivery is skipped."""
        cursor: str | None = None
        backoff = Backoff(cap_s=0.5)
        while True:
            try:
                if cursor is None:
                    # "$" made concrete once (as redis_queues.tail_cursor does): an XREAD at "$" after an
                    # empty one would skip what was added between the two, a request's first token.
                    cursor = await self._reply_tail()
                batches = await self.client.xread({self.reply_stream: cursor}, count=512, block=1000)
                for _stream, entries in batches or ():
                    for entry_id, data in entries:
                        cursor = entry_id
                        self._dispatch(data)
                    await self.client.xtrim(self.reply_stream, minid=cursor, approximate=True)
                backoff.reset()
            except CONNECTION_ERRORS:
                self.redis_suspected.set()
                await asyncio.sleep(backoff.next())

    async def _reply_tail(self) -> str:
        """The reply stream's newest id; "0-0" while it does not exist, so its first entry is read."""
        try:
            info = await self.client.xinfo_stream(self.reply_stream)
        except aioredis.ResponseError:
            return "0-0"
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else last

    def _dispatch(self, data: dict) -> None:
        try:
            deliveries = stream_entries.read_deliveries(data)
        except stream_entries.EntryError:
            log.warning("malformed reply entry dropped: %r", data)
            return
        for delivery in deliveries:
            queue = self.pending.get(delivery.request_id)
            if queue is not None:
                queue.put_nowait(delivery)

    # ------------------------------------------------------------------ requests
    def tokenize(self, text: str) -> list[int]:
        tok = self._ready_tokenizer()
        if len(text) > self.config.max_prompt_chars:
            raise InvalidInput(f"text: longer than {self.config.max_prompt_chars} characters")
        return tok.encode(text)

    def _ready_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None or self.info is None:
            raise NotReady("the gateway is starting: the model is not loaded yet; retry shortly")
        return self.tokenizer

    def prompt_ids(self, req: GenerateInput) -> list[int]:
        """Tokenize whichever input was given; every bound checked before the expensive part."""
        tok = self._ready_tokenizer()
        if req.token_ids is not None:
            ids = list(req.token_ids)
            bad = next((t for t in ids if not 0 <= t < self.info.vocab_size), None)
            if bad is not None:
                raise InvalidInput(f"token_ids: {bad} is outside the vocabulary [0, {self.info.vocab_size})")
        elif req.messages is not None:
            if not req.messages:
                raise InvalidInput("messages: at least one message is required")
            if len(req.messages) > self.config.max_messages:
                raise InvalidInput(f"messages: at most {self.config.max_messages} messages")
            if sum(len(c) for _, c in req.messages) > self.config.max_prompt_chars:
                raise InvalidInput(f"messages: longer than {self.config.max_prompt_chars} characters in all")
            try:
                ids = tok.apply_chat_template([{"role": r, "content": c} for r, c in req.messages])
            except ValueError as e:
                raise InvalidInput(str(e)) from None
        elif req.prompt is not None and req.prompt.strip():
            ids = self.tokenize(req.prompt)
        else:
            raise InvalidInput("prompt: empty; give a prompt, messages or token_ids")
        if not ids:
            raise InvalidInput("prompt: tokenizes to no tokens")
        return ids

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        info = self.info
        if num_prompt >= info.max_model_len:
            raise InvalidInput(f"prompt: {num_prompt} tokens; the model's context is {info.max_model_len} tokens")
        if params.max_tokens > self.config.max_tokens_limit:
            raise InvalidInput(f"max_tokens: at most {self.config.max_tokens_limit}, got {params.max_tokens}")
        if num_prompt + params.max_tokens > info.max_model_len:
            raise InvalidInput(f"max_tokens: the prompt has {num_prompt} tokens, so at most "
                               f"{info.max_model_len - num_prompt} more fit the {info.max_model_len}-token context")
        if blocks_for_tokens(num_prompt + 1, info.block_size) > info.num_kv_blocks:
            raise InvalidInput(f"prompt: {num_prompt} tokens do not fit the KV pool "
                               f"({info.num_kv_blocks * info.block_size} tokens)")
        bad = next((t for t in params.stop_token_ids if not 0 <= t < info.vocab_size), None)
        if bad is not None:
            raise InvalidInput(f"stop_token_ids: {bad} is outside the vocabulary [0, {info.vocab_size})")

    async def _check_queue(self) -> None:
        depth = await _queue_depth(self.client, self.keys.prefill_queue)
        if depth >= self.config.max_queue_len:
            raise QueueFull(f"the prefill queue holds {depth} requests (limit {self.config.max_queue_len}); "
                            "retry with backoff")

    def fail_all(self, error: str) -> None:
        """End every stream in flight with `error` (Redis came back without its data: redis_watch.py)."""
        for request_id, queue in self.pending.items():
            queue.put_nowait(TokenDelivery(request_id, (), "error", error))

    async def write_unsent(self) -> None:
        """The cancels and releases kept while Redis was away, in order (a connection error leaves
        the rest kept). Each is idempotent: one that had landed after all does no harm."""
        while self.unsent:
            await self.unsent[0]()
            self.unsent.pop(0)

    def _keep_unsent(self, write: Callable[[], Awaitable[object]]) -> None:
        self.redis_suspected.set()
        self.unsent.append(write)
        del self.unsent[:-UNSENT_MAX]

    def _redis_lost(self) -> NotReady:
        """A command failed for want of Redis: refuse new requests now, and have the watch probe."""
        self.redis_ok = False
        self.redis_suspected.set()
        return NotReady(UNREACHABLE)

    async def generate(self, req: GenerateInput) -> AsyncIterator[Chunk]:
        """Stream one request's completion. Cancelling the consumer cancels the request."""
        if not self.redis_ok:
            raise NotReady(UNREACHABLE)
        prompt = self.prompt_ids(req)
        self.check_fits(len(prompt), req.sampling)
        try:
            await self._check_queue()
            ids = await request_ids.claim(self.client, self.keys, req.request_id)
        except CONNECTION_ERRORS:
            raise self._redis_lost() from None
        engine_id = ids.engine_id          # the workers' name for it (request_ids.py)
        timing = _Timing(arrival=time.time())
        queue: asyncio.Queue = asyncio.Queue()
        self.pending[engine_id] = queue
        self.metrics.num_requests_waiting.inc()
        is_done = False
        ended = "abort"          # unless it finishes: the client went away or its deadline passed
        try:
            try:   # when it fails, it may still have landed: the cancel below (published once Redis is back) undoes it
                await stream_entries.add(self.client, stream_entries.queued(self.keys, QueuedRequest(
                    engine_id, tuple(prompt), req.sampling, self.reply_stream, timing.arrival)))
            except CONNECTION_ERRORS:
                raise self._redis_lost() from None
            async for chunk in self._stream(ids, prompt, req.sampling, queue, timing):
                is_done = chunk.finish_reason is not None
                yield chunk
                await self._refresh(ids)
        except Exception:
            ended = "error"      # the engine failed it, no token for too long, Redis gone
            raise
        finally:
            self.pending.pop(engine_id, None)
            gauge = self.metrics.num_requests_running if timing.is_running else self.metrics.num_requests_waiting
            gauge.dec()
            if not is_done:     # client gone, deadline, or error: free its blocks wherever it is
                self.metrics.observe_finished(len(prompt), timing.num_tokens, time.time() - timing.arrival, ended)
                await self._cancel(engine_id, "cancelled")
            await self._release(ids)

    async def _stream(self, ids: request_ids.RequestIds, prompt: list[int], params: SamplingParams,
                      queue: asyncio.Queue, timing: _Timing) -> AsyncIterator[Chunk]:
        request_id = ids.client_id
        state = OutputState(params, self.tokenizer.detokenizer(prompt))
        eos = set(self.info.eos_token_ids) if not params.ignore_eos else set()
        stop_ids = eos | set(params.stop_token_ids)
        completion: list[int] = []
        while True:
            delivery = (await self._next_delivery(queue, request_id, started=bool(completion))).after(len(completion))
            new_ids: list[int] = []
            for token in delivery.token_ids:
                completion.append(token)
                new_ids.append(token)
                state.push(token, is_special_stop=token in stop_ids)
                if state.hit_stop_string:
                    break
            finish = delivery.finish_reason
            if state.hit_stop_string:
                finish = "stop"
                await self._cancel(ids.engine_id, "stop")   # the workers may run one more iteration; fine
            self._observe_tokens(timing, delivery, len(new_ids))
            usage = self._usage(timing, len(prompt), len(completion)) if finish else None
            if finish:          # counted before the last chunk goes out: a client may close on receiving it
                self.metrics.observe_finished(len(prompt), len(completion), usage.e2e_ms / 1000, finish)
            # only the tokens kept in this chunk (a stop string may end it inside the delivery)
            logprobs = delivery.logprobs[:len(new_ids)]
            yield Chunk(request_id, tuple(new_ids), state.take_text(finish is not None), finish, usage, logprobs)
            if finish:
                await self._record_latency(usage)
                return

    async def _next_delivery(self, queue: asyncio.Queue, request_id: str, started: bool) -> TokenDelivery:
        try:
            delivery = await asyncio.wait_for(queue.get(), timeout=self.config.stall_timeout_s)
        except asyncio.TimeoutError:
            raise NotReady(f"request {request_id}: no token for {self.config.stall_timeout_s:.0f} s; "
                           "the workers may be down") from None
        if delivery.finish_reason == "error" and not started and not delivery.token_ids:
            raise NotReady(f"request {request_id} failed in the engine: {delivery.error}")
        return delivery

    def _observe_tokens(self, timing: _Timing, delivery: TokenDelivery, num_new: int) -> None:
        now = time.time()
        if delivery.queue_time_ms is not None:
            timing.queue_time_ms = delivery.queue_time_ms
        if not timing.is_running:
            timing.is_running = True
            self.metrics.num_requests_waiting.dec()
            self.metrics.num_requests_running.inc()
        if num_new == 0:
            return
        timing.num_tokens += num_new
        if timing.first_token is None:
            timing.first_token = now
            self.metrics.time_to_first_token.observe(now - timing.arrival)
        elif timing.last_token is not None:
            self.metrics.inter_token_latency.observe((now - timing.last_token) / num_new)
        timing.last_token = now

    @staticmethod
    def _usage(timing: _Timing, num_prompt: int, num_completion: int) -> Usage:
        now = time.time()
        ttft = ((timing.first_token or now) - timing.arrival) * 1000
        return Usage(num_prompt, num_completion, timing.queue_time_ms, ttft, (now - timing.arrival) * 1000)

    async def _refresh(self, ids: request_ids.RequestIds) -> None:
        """Renew the request id's claim; while Redis is away the stream goes on (the claim lasts minutes)."""
        try:
            await request_ids.refresh(self.client, ids)
        except CONNECTION_ERRORS:
            self.redis_suspected.set()

    async def _record_latency(self, usage: Usage) -> None:
        tpot = (usage.e2e_ms - usage.ttft_ms) / (usage.completion_tokens - 1) if usage.completion_tokens > 1 else 0.0
        sample = RequestLatency(usage.ttft_ms, tpot, usage.prompt_tokens, usage.completion_tokens, time.time())
        try:      # a sample for the orchestrator: not worth failing a finished request over
            await stream_entries.add(self.client, stream_entries.latency(self.keys, sample))
        except CONNECTION_ERRORS:
            self.redis_suspected.set()

    async def _release(self, ids: request_ids.RequestIds) -> None:
        try:
            await request_ids.release(self.client, ids)
        except CONNECTION_ERRORS:      # else the client's id stays taken until its claim expires
            self._keep_unsent(lambda: request_ids.release(self.client, ids))
        except aioredis.RedisError:
            log.warning("could not release request id %s (it expires by itself)", ids.client_id)

    async def _cancel(self, request_id: str, reason: str) -> None:
        notice = CancelNotice(request_id, reason)
        try:
            await self._xadd_cancel(notice)
        except CONNECTION_ERRORS:     # published when Redis is back (redis_watch.py)
            self._keep_unsent(lambda: self._xadd_cancel(notice))
        except aioredis.RedisError:
            log.warning("could not publish cancel for %s", request_id)

    async def _xadd_cancel(self, notice: CancelNotice) -> None:
        await stream_entries.add(self.client, stream_entries.cancel(self.keys, notice))


async def _queue_depth(client: aioredis.Redis, stream: str) -> int:
    """Requests waiting for prefill or being prefilled: workers delete an entry once it has left
    prefill, so the stream's length is exactly that."""
    return int(await client.xlen(stream))
