"""The gateway's core: validate, tokenize, enqueue, and turn token deliveries into text chunks.

A request's life in the gateway:
  accepted     fields checked and bounded before any work (InvalidInput names the field),
               prompt tokenized off the event loop (chat template for messages; `prompts.py`),
               checked against the context and
               the KV pool; a full prefill queue refuses it (QueueFull)
  queued       a QueuedRequest on the prefill stream, replies to this gateway's reply stream; in the
               same transaction its RequestRecord, for a restarted gateway to adopt it (adoption.py)
  streaming    each TokenDelivery's tokens are kept (inflight.py) and detokenized incrementally for
               the one call following it (never splitting a character); stop strings are matched
               here, and a hit sends a CancelNotice so the workers stop
  re-attached  Attach: a client that lost its stream (a gateway restart) follows it again from the
               token after the last one it has, text restarted from the prompt and those tokens; a
               request of a dead gateway is adopted first (takeover.py), one of a live one refused
               with UNAVAILABLE (the SDK retries)
  finished     last chunk with finish reason and usage (prompt/completion tokens, queue, TTFT, e2e)
  cancelled    the client went away or its deadline passed: a CancelNotice frees its blocks; counted
               as finished with reason "abort" (an error on the way: "error"), as vLLM counts them.
               An adopted request no client re-attached to within the orphan timeout: the same
While Redis does not answer (redis_watch.py) new requests are refused with UNAVAILABLE and streams in
flight wait for their next token; a cancel, a request id's release or a record's deletion that could
not be written is kept in the outbox and written once it is back.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Protocol

import redis.asyncio as aioredis

from services.common import stream_entries
from services.common.contracts import CancelNotice, KeySpace, QueuedRequest, RequestLatency, TokenDelivery
from services.common.model_info import ModelInfo, parse_model_info
from services.common.redis_retry import CONNECTION_ERRORS, UNREACHABLE
from services.engine.blocks import blocks_for_tokens
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.gateway.config import GatewayConfig
from services.gateway import adoption, peers, request_ids
from services.gateway.errors import InvalidInput, NotReady, QueueFull, RequestNotFound, Superseded
from services.gateway.follower import Chunk, Follower, Usage  # noqa: F401 (Chunk, Usage: the API's types)
from services.gateway.inflight import InFlight, RequestRecord
from services.gateway.metrics import GatewayMetrics
from services.gateway.outbox import Outbox
from services.gateway.pair_requests import PairRequests
from services.gateway.pairs import Pairs
from services.gateway.prompts import PromptEncoder, PromptLimits
from services.gateway.replies import ReplyStreams

log = logging.getLogger("duoserve.gateway")



class Peers(Protocol):
    """What the frontend asks of the gateway's takeover (takeover.Takeover): adopting another's requests."""

    async def adopt_owner_of(self, client_id: str) -> None:
        """Adopt the requests of the dead gateway that holds `client_id` (NotReady if it is alive)."""

    async def done_with(self, gateway_id: str) -> None:
        """The last request adopted from `gateway_id` ended here: let its keys go."""

    async def rejoin(self) -> None:
        """Redis came back without its data: hold the own gateway id again."""


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """A Generate call after conversion from protobuf: exactly one of the three inputs is set."""

    request_id: str                                   # "" asks the gateway to assign one
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None   # (role, content) pairs
    token_ids: tuple[int, ...] | None = None


@dataclass
class Frontend(ReplyStreams, PairRequests):
    config: GatewayConfig
    client: aioredis.Redis
    metrics: GatewayMetrics
    keys: KeySpace = field(init=False)
    info: ModelInfo | None = None
    tokenizer: Tokenizer | None = None
    prompts: PromptEncoder | None = None          # tokenizes off the event loop; set with the tokenizer
    requests: dict[str, InFlight] = field(default_factory=dict)   # engine id -> a request this gateway holds
    by_client: dict[str, str] = field(default_factory=dict)       # client id -> engine id
    cursors: dict[str, str] = field(default_factory=dict)   # reply stream -> its last entry read: its own, and
                                         # those of the gateway ids it adopted requests from
    is_adopted: bool = False             # the predecessor's requests are taken over (Attach may be served)
    peers: Peers | None = None           # adopts other gateways' requests (main sets it; None: only its own)
    _trimmed_at: float = 0.0             # time.monotonic() of the reply stream's last XTRIM
    _ids: dict[str, request_ids.RequestIds] = field(default_factory=dict)   # engine id -> its ids' claim
    redis_ok: bool = True                # set by redis_watch.RedisWatch: False refuses new requests
    redis_suspected: asyncio.Event = field(default_factory=asyncio.Event)   # a command failed: probe now
    outbox: Outbox = field(init=False)   # writes kept while Redis is away
    pairs: Pairs = field(init=False)     # the pairs it routes between (pairs.py; one: its own key space)
    model_keys: KeySpace = field(init=False)   # the key space its model info was read from (a pair's)

    def __post_init__(self) -> None:
        self.keys = KeySpace(self.config.key_prefix)        # the gateways' own keys (replies, records, ids)
        self.pairs = Pairs(self.client, self.config.pairs, on_view=self._pair_seen)
        self.model_keys = self.pairs.keys(self.pairs.prefixes[0])
        self.gateway_id = peers.incarnation_id(self.config.gateway_id)   # this process's: peers.py
        self.reply_stream = self.keys.reply(self.gateway_id)
        self.outbox = Outbox(self.redis_suspected)

    # ------------------------------------------------------------------ start-up
    async def wait_for_model(self) -> None:
        """Block until the stack has published its model; load the tokenizer from it."""
        deadline = time.monotonic() + self.config.model_wait_s
        while (raw := await self._model_info_now()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model published under {' or '.join(self.pairs.keys(p).model_info for p in self.pairs.prefixes)} after "
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

    async def _model_info_now(self) -> bytes | None:
        """The model as the first pair that published it says (every pair serves the same one)."""
        for prefix in self.pairs.prefixes:
            try:
                raw = await self.client.hget(self.pairs.keys(prefix).model_info, "json")
            except CONNECTION_ERRORS:
                return None       # Redis not up yet (or restarting): asked again until the deadline
            if raw is not None:
                self.model_keys = self.pairs.keys(prefix)
                return raw
        return None

    async def sweep_orphans(self) -> None:
        """Cancel the adopted requests no client re-attached to within the orphan timeout, forever."""
        timeout = self.config.orphan_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for request in [r for r in self.requests.values() if r.is_orphan_for(timeout, now)]:
                log.warning("request %s: no client re-attached within %g s; cancelled", request.record.client_id,
                            timeout)
                try:
                    await self._end(request, "abort")
                except Exception:          # noqa: BLE001 - the sweep goes on for the others
                    log.exception("could not end request %s", request.record.client_id)

    async def shutdown(self) -> None:
        """After the servers stopped: end what no call holds (the keys go with the lease: Takeover.close)."""
        for request in list(self.requests.values()):
            await self._end(request, "abort")

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

    async def _check_queue(self, keys: KeySpace) -> None:
        depth = await _queue_depth(self.client, keys.prefill_queue)
        if depth >= self.config.max_queue_len:
            raise QueueFull(f"the prefill queue holds {depth} requests (limit {self.config.max_queue_len}); "
                            "retry with backoff")

    async def generate(self, req: GenerateInput,
                       accepted: Callable[[str], Awaitable[None]] | None = None) -> AsyncIterator[Chunk]:
        """Stream one request's completion. Cancelling the consumer cancels the request. `accepted`
        (the request's id) is awaited once it is queued: from then on a client may re-attach to it."""
        if not self.redis_ok:
            raise NotReady(UNREACHABLE)
        prompt = await self.prompt_ids(req)
        self.check_fits(len(prompt), req.sampling)
        try:
            pair = await self._pick_pair(prompt)
            ids = await request_ids.claim(self.client, self.keys, req.request_id)
        except CONNECTION_ERRORS:
            raise self._redis_lost() from None
        arrival = time.time()
        record = RequestRecord(ids.client_id, ids.engine_id, ids.claim_key is not None,
                               tuple(prompt[-adoption.PROMPT_TAIL:]), len(prompt), req.sampling, arrival,
                               self.cursor or "0-0", pair=pair)
        request = self._track(record, ids)
        request.prompt_ids = tuple(prompt)          # kept whole: a dead pair's request is sent again (resend)
        try:
            pipe = self.client.pipeline(transaction=True)    # queued only with its record (adoption.py)
            adoption.save(pipe, self.keys, self.gateway_id, record)
            stream_entries.add(pipe, stream_entries.queued(self.pairs.keys(pair), QueuedRequest(
                ids.engine_id, tuple(prompt), req.sampling, self.reply_stream, arrival)))
            try:   # when it fails, it may still have landed: the cancel _end keeps for later undoes it
                await pipe.execute()
            except CONNECTION_ERRORS:
                raise self._redis_lost() from None
            if accepted is not None:
                await accepted(ids.client_id)
        except BaseException as e:
            await self._end(request, "error" if isinstance(e, Exception) else "abort")
            raise
        async for chunk in self._follow(request, 0):
            yield chunk

    async def attach(self, client_id: str, num_received: int) -> AsyncIterator[Chunk]:
        """Stream a request this gateway holds from its output token `num_received` on (the client has
        the ones before); the call that streamed it so far, if any, ends (Superseded)."""
        self._ready_tokenizer()
        if not self.is_adopted:
            raise NotReady("the gateway is starting: it is taking over its requests in flight; retry shortly")
        request = self.requests.get(self.by_client.get(client_id, ""))
        if request is None and self.peers is not None:
            try:        # a dead gateway's: adopted now; a live one's: NotReady, the SDK retries
                await self.peers.adopt_owner_of(client_id)
            except CONNECTION_ERRORS:
                raise self._redis_lost() from None
            request = self.requests.get(self.by_client.get(client_id, ""))
        if request is None:
            raise RequestNotFound(
                f"request {client_id!r} is not running on this stack: it ended (finished, cancelled, or no "
                f"client re-attached within {self.config.orphan_timeout_s:g} s of its gateway's death); "
                "send it again with Generate")
        if num_received > len(request.token_ids):
            raise InvalidInput(f"num_received_tokens: {num_received}, but request {client_id!r} has produced "
                               f"{len(request.token_ids)} tokens so far")
        async for chunk in self._follow(request, num_received):
            yield chunk

    def _track(self, record: RequestRecord, ids: request_ids.RequestIds) -> InFlight:
        """A request this process accepted (recorded under its own gateway id)."""
        return self._register(InFlight(record, origin=self.gateway_id), ids)

    def _register(self, request: InFlight, ids: request_ids.RequestIds) -> InFlight:
        record = request.record
        self.requests[record.engine_id] = request
        self.by_client[record.client_id] = record.engine_id
        self._ids[record.engine_id] = ids
        gauge = self.metrics.num_requests_running if request.is_running else self.metrics.num_requests_waiting
        gauge.inc()
        return request

    def _untrack(self, request: InFlight) -> request_ids.RequestIds | None:
        """The request leaves this process's books (None: it had already)."""
        record = request.record
        if self.requests.pop(record.engine_id, None) is None:
            return None
        self.by_client.pop(record.client_id, None)
        gauge = self.metrics.num_requests_running if request.is_running else self.metrics.num_requests_waiting
        gauge.dec()
        return self._ids.pop(record.engine_id)

    async def _follow(self, request: InFlight, num_received: int) -> AsyncIterator[Chunk]:
        """Stream a request's output from token `num_received` to its end, as its one subscriber."""
        me = request.subscribe()
        record = request.record
        follower = Follower(request, self.tokenizer.detokenizer(record.prompt_tail), self.info.eos_token_ids,
                            num_received)
        done, ended = False, "abort"       # unless it finishes: the client went away
        try:
            while True:
                if not follower.hit_stop_string and not await request.wait_for_more(
                        me, follower.sent, self.config.stall_timeout_s):
                    raise NotReady(f"request {record.client_id}: no token for {self.config.stall_timeout_s:.0f} s; "
                                   "the workers may be down")
                if not request.is_current(me):
                    raise Superseded(f"request {record.client_id}: another call attached to it; this one ends")
                if request.lost_to:
                    raise NotReady(f"request {record.client_id}: gateway {request.lost_to} follows it now; "
                                   "re-attach (the SDK does it by itself)")
                if request.finish == "error" and not request.token_ids:
                    raise NotReady(f"request {record.client_id} failed in the engine: {request.error}")
                chunk = follower.next_chunk(time.time())
                if follower.hit_stop_string and request.finish is None:
                    await self._cancel(request.record.engine_id, "stop", request.record.pair)   # the workers may run one more iteration; fine
                done = chunk.finish_reason is not None
                if done:        # counted before the last chunk goes out: a client may close on receiving it
                    self.metrics.observe_finished(record.num_prompt_tokens, follower.sent,
                                                  chunk.usage.e2e_ms / 1000, chunk.finish_reason)
                yield chunk
                if done:
                    await self._record_latency(chunk.usage, request.record.pair)
                    return
                await self._refresh(self._ids[request.record.engine_id])   # its ids now (resend renames)
        except Exception:
            ended = "error"      # the engine failed it, no token for too long, Redis gone, superseded
            raise
        finally:
            if request.is_current(me):      # a superseded call leaves the request to the one that attached
                await self._end(request, None if done else ended)

    async def _end(self, request: InFlight, ended: str | None) -> None:
        """The request leaves this gateway. `ended`: None once its last chunk went out, else why not
        ("abort", "error"): then the workers are told to drop it (freeing its blocks) unless it finished."""
        record = request.record
        ids = self._untrack(request)
        if ids is None:
            return
        if ended is not None:
            self.metrics.observe_finished(record.num_prompt_tokens, len(request.token_ids),
                                          time.time() - record.arrival_time, ended)
            if request.finish is None:
                await self._cancel(record.engine_id, "cancelled", record.pair)
        forget = functools.partial(adoption.forget, self.client, self.keys, request.origin, record.engine_id)
        try:
            await forget()
        except CONNECTION_ERRORS:      # else a restarted gateway would adopt it, then time it out
            self.outbox.keep(forget)
        except aioredis.RedisError:
            log.warning("could not delete the record of %s", record.client_id)
        await self._release(ids)
        origin = request.origin
        if origin != self.gateway_id and self.peers is not None and not any(
                r.origin == origin for r in self.requests.values()):
            try:
                await self.peers.done_with(origin)
            except CONNECTION_ERRORS:          # Takeover.run tries again
                self.redis_suspected.set()

    async def _record_latency(self, usage: Usage, pair: str) -> None:
        tpot = (usage.e2e_ms - usage.ttft_ms) / (usage.completion_tokens - 1) if usage.completion_tokens > 1 else 0.0
        sample = RequestLatency(usage.ttft_ms, tpot, usage.prompt_tokens, usage.completion_tokens, time.time())
        try:      # a sample for the orchestrator: not worth failing a finished request over
            await stream_entries.add(self.client, stream_entries.latency(self.pairs.keys(pair), sample))
        except CONNECTION_ERRORS:
            self.redis_suspected.set()

    async def _refresh(self, ids: request_ids.RequestIds) -> None:
        """Renew the request id's claim; while Redis is away the stream goes on (the claim lasts minutes)."""
        try:
            await request_ids.refresh(self.client, ids)
        except CONNECTION_ERRORS:
            self.redis_suspected.set()

    async def _release(self, ids: request_ids.RequestIds) -> None:
        try:
            await request_ids.release(self.client, ids)
        except CONNECTION_ERRORS:      # else the client's id stays taken until its claim expires
            self.outbox.keep(functools.partial(request_ids.release, self.client, ids))
        except aioredis.RedisError:
            log.warning("could not release request id %s (it expires by itself)", ids.client_id)

    async def _cancel(self, request_id: str, reason: str, pair: str = "") -> None:
        """Tell the workers of the request's pair to drop it (its KV blocks come back)."""
        write = functools.partial(stream_entries.add, self.client, stream_entries.cancel(
            self.pairs.keys(pair), CancelNotice(request_id, reason)))
        try:
            await write()
        except CONNECTION_ERRORS:     # published when Redis is back (redis_watch.py)
            self.outbox.keep(write)
        except aioredis.RedisError:
            log.warning("could not publish cancel for %s", request_id)

    # ------------------------------------------------------------------ Redis away (redis_watch.py)
    def fail_all(self, error: str) -> None:
        """End every stream in flight with `error` (Redis came back without its data)."""
        now = time.time()
        for request in self.requests.values():
            request.add(TokenDelivery(request.record.engine_id, (), "error", error), now)

    def _redis_lost(self) -> NotReady:
        """A command failed for want of Redis: refuse new requests now, and have the watch probe."""
        self.redis_ok = False
        self.redis_suspected.set()
        return NotReady(UNREACHABLE)


async def _queue_depth(client: aioredis.Redis, stream: str) -> int:
    """Requests waiting for prefill or being prefilled: workers delete an entry once it has left
    prefill, so the stream's length is exactly that."""
    return int(await client.xlen(stream))
