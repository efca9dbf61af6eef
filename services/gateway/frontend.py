"""The gateway's core: validate, tokenize, enqueue, and turn token deliveries into text chunks.

A request's life in the gateway:
  accepted     fields checked and bounded before any work (InvalidInput names the field),
               prompt tokenized off the event loop (chat template for messages; `prompts.py`),
               checked against the context and
               the KV pool; a full prefill queue refuses it (QueueFull)
  queued       a QueuedRequest on the prefill stream, replies to this gateway's reply stream
  streaming    each TokenDelivery is detokenized incrementally (never splitting a character);
               stop strings are matched here, and a hit sends a CancelNotice so the workers stop
  finished     last chunk with finish reason and usage (prompt/completion tokens, queue, TTFT, e2e)
  cancelled    the client went away or its deadline passed: a CancelNotice frees its blocks; counted
               as finished with reason "abort" (an error on the way: "error"), as vLLM counts them
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import redis.asyncio as aioredis

from services.common.contracts import (CancelNotice, KeySpace, QueuedRequest, RequestLatency, TokenDelivery,
                                       TokenLogprob, deliveries_from_json, to_json)
from services.common.model_info import ModelInfo, parse_model_info
from services.engine.blocks import blocks_for_tokens
from services.engine.output import OutputState
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway import request_ids
from services.gateway.errors import InvalidInput, NotReady, QueueFull
from services.gateway.metrics import GatewayMetrics
from services.gateway.prompts import PromptEncoder, PromptLimits

log = logging.getLogger("duoserve.gateway")

CANCEL_STREAM_MAXLEN = 100_000      # cancels are read within an iteration; older ones are history
LATENCY_MAXLEN = 10_000             # finished requests kept for SLO attainment


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
    prompts: PromptEncoder | None = None          # tokenizes off the event loop; set with the tokenizer
    pending: dict[str, asyncio.Queue] = field(default_factory=dict)   # request id -> its deliveries

    def __post_init__(self) -> None:
        self.keys = KeySpace(self.config.key_prefix)
        self.reply_stream = self.keys.reply(self.config.gateway_id)

    # ------------------------------------------------------------------ start-up
    async def wait_for_model(self) -> None:
        """Block until the stack has published its model; load the tokenizer from it."""
        deadline = time.monotonic() + self.config.model_wait_s
        while (raw := await self.client.hget(self.keys.model_info, "json")) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model published under {self.keys.model_info} after "
                                   f"{self.config.model_wait_s:.0f} s; is the arena (or colocated worker) up?")
            await asyncio.sleep(0.2)
        info = parse_model_info(raw)
        self.tokenizer = await asyncio.to_thread(Tokenizer.from_dir, info.model_dir)
        limits = PromptLimits(self.config.max_prompt_chars, self.config.max_messages, info.max_model_len,
                              info.vocab_size, self.tokenizer.longest_token_chars)
        self.prompts = PromptEncoder(self.tokenizer, limits, self.config.tokenizer_threads,
                                     self.config.max_tokenize_waiting)
        self.metrics.bind_model(info.name)
        self.info = info
        log.info("serving %s (%s mode, context %d, %d KV blocks)", info.name, info.mode, info.max_model_len,
                 info.num_kv_blocks)

    async def read_replies(self) -> None:
        """Dispatch this gateway's reply stream to the waiting requests, forever."""
        cursor: str | None = None
        while True:
            try:
                if cursor is None:
                    # "$" made concrete once (as redis_queues.tail_cursor does): an XREAD at "$" after an
                    # empty one would skip what was added between the two, a request's first token.
                    cursor = await self._reply_tail()
                batches = await self.client.xread({self.reply_stream: cursor}, count=512, block=1000)
            except aioredis.ConnectionError:
                log.warning("redis unreachable; retrying")
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in batches or ():
                for entry_id, data in entries:
                    cursor = entry_id
                    self._dispatch(data)
                await self.client.xtrim(self.reply_stream, minid=cursor, approximate=True)

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
            deliveries = deliveries_from_json(data[b"m"])
        except (KeyError, ValueError, TypeError):
            log.warning("malformed reply entry dropped: %r", data)
            return
        for delivery in deliveries:
            queue = self.pending.get(delivery.request_id)
            if queue is not None:
                queue.put_nowait(delivery)

    # ------------------------------------------------------------------ requests
    async def tokenize(self, text: str, field: str = "text", add_special_tokens: bool = True) -> list[int]:
        """Any text up to max_prompt_chars, off the event loop."""
        return await self._ready_prompts().tokenize(text, field, add_special_tokens)

    def _ready_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None or self.info is None:
            raise NotReady("the gateway is starting: the model is not loaded yet; retry shortly")
        return self.tokenizer

    def _ready_prompts(self) -> PromptEncoder:
        self._ready_tokenizer()
        return self.prompts

    async def prompt_ids(self, req: GenerateInput) -> list[int]:
        """Tokenize whichever input was given, off the event loop; every bound checked before."""
        return await self._ready_prompts().prompt_ids(req.prompt, req.messages, req.token_ids)

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

    async def generate(self, req: GenerateInput) -> AsyncIterator[Chunk]:
        """Stream one request's completion. Cancelling the consumer cancels the request."""
        prompt = await self.prompt_ids(req)
        self.check_fits(len(prompt), req.sampling)
        await self._check_queue()
        ids = await request_ids.claim(self.client, self.keys, req.request_id)
        engine_id = ids.engine_id          # the workers' name for it (request_ids.py)
        timing = _Timing(arrival=time.time())
        queue: asyncio.Queue = asyncio.Queue()
        self.pending[engine_id] = queue
        self.metrics.num_requests_waiting.inc()
        is_done = False
        ended = "abort"          # unless it finishes: the client went away or its deadline passed
        try:
            # "n" and "t" let the orchestrator see the queue without parsing every prompt.
            await self.client.xadd(self.keys.prefill_queue, {"m": to_json(QueuedRequest(
                engine_id, tuple(prompt), req.sampling, self.reply_stream, timing.arrival)),
                "n": len(prompt), "t": repr(timing.arrival)})
            async for chunk in self._stream(ids, prompt, req.sampling, queue, timing):
                is_done = chunk.finish_reason is not None
                yield chunk
                await request_ids.refresh(self.client, ids)
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

    async def _record_latency(self, usage: Usage) -> None:
        tpot = (usage.e2e_ms - usage.ttft_ms) / (usage.completion_tokens - 1) if usage.completion_tokens > 1 else 0.0
        sample = RequestLatency(usage.ttft_ms, tpot, usage.prompt_tokens, usage.completion_tokens, time.time())
        await self.client.xadd(self.keys.latencies, {"m": to_json(sample)}, maxlen=LATENCY_MAXLEN, approximate=True)

    async def _release(self, ids: request_ids.RequestIds) -> None:
        try:
            await request_ids.release(self.client, ids)
        except aioredis.RedisError:
            log.warning("could not release request id %s (it expires by itself)", ids.client_id)

    async def _cancel(self, request_id: str, reason: str) -> None:
        try:
            await self.client.xadd(self.keys.cancel, {"m": to_json(CancelNotice(request_id, reason))},
                                   maxlen=CANCEL_STREAM_MAXLEN, approximate=True)
        except aioredis.RedisError:
            log.warning("could not publish cancel for %s", request_id)


async def _queue_depth(client: aioredis.Redis, stream: str) -> int:
    """Requests waiting for prefill or being prefilled: workers delete an entry once it has left
    prefill, so the stream's length is exactly that."""
    return int(await client.xlen(stream))
