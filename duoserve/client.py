"""The duoserve SDK: a blocking Client and an asyncio AsyncClient for the public Generation API.

A request's life here:
  built      keyword arguments become a GenerateRequest; only the sampling fields given are
             sent, so the server applies its defaults to the rest
  streaming  each GenerateResponse becomes a Chunk (new token ids, text delta); the last one
             carries the finish reason and the usage
  finished   the server ends the stream; generate() has joined the chunks into a Completion
  cancelled  the caller closed the stream, left its `with` block, or dropped it: the RPC is
             cancelled and the server frees the request's KV blocks
  lost       the connection to the gateway failed mid-stream (UNAVAILABLE: it was killed and is being
             restarted): the stream re-attaches to the request by itself (`duoserve.reattach`) and
             goes on after the last token received, for up to `reattach_s` seconds

    with Client("localhost:50051") as client:
        print(client.generate("The capital of France is", max_tokens=8).text)
        with client.stream(messages=[{"role": "user", "content": "Hi"}]) as chunks:
            for chunk in chunks:
                print(chunk.text, end="", flush=True)

Every failed call raises a duoserve.errors.DuoserveError subclass (InvalidArgument, Unavailable,
ResourceExhausted, ...), never a grpc.RpcError.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import EnumDescriptor

from duoserve import errors
from duoserve.channel import Tls, channel_credentials, open_aio_channel, open_channel
from duoserve.reattach import CHANNEL_OPTIONS, DEFAULT_WINDOW_S, Reattacher
from duoserve.targets import with_default_port
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc as pb_grpc

CHAT_MESSAGE_KEYS = ("role", "content")


@dataclass(frozen=True, slots=True)
class Usage:
    """What a request cost and how long it took, measured by the gateway."""

    prompt_tokens: int          # input tokens after tokenization and the chat template
    completion_tokens: int      # tokens generated
    queue_time_ms: float        # arrival at the gateway to the start of prefill
    ttft_ms: float              # arrival at the gateway to the first token sent
    e2e_ms: float               # arrival at the gateway to the last response sent


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its position (from the
    model's raw output, before penalties, temperature, top_k and top_p)."""

    token_id: int                               # the generated token
    logprob: float                              # its log-probability (natural log)
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob) of the `logprobs` most likely, best first


@dataclass(frozen=True, slots=True)
class Chunk:
    """One step of a streamed request."""

    request_id: str                     # the client's id, or the one the gateway assigned
    text: str                           # text added since the previous chunk
    token_ids: tuple[int, ...]          # token ids generated since the previous chunk
    finish_reason: str | None = None    # "stop", "length", "cancelled" or "error" on the last chunk
    usage: Usage | None = None          # on the last chunk only
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when the request set `logprobs`


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole request's output: every chunk joined."""

    request_id: str                     # the client's id, or the one the gateway assigned
    text: str                           # the completion text (stop strings cut off)
    token_ids: tuple[int, ...]          # every generated token id, in order
    finish_reason: str                  # "stop", "length", "cancelled" or "error"
    usage: Usage                        # token counts and latencies (zeros if the server sent none)
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when the request set `logprobs`


# ---------------------------------------------------------------------------------------------
# Conversions between keyword arguments / dataclasses and protobuf messages (pure, no I/O)
# ---------------------------------------------------------------------------------------------

def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Iterable[Mapping[str, str]] | None = None,
    token_ids: Iterable[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    stop_token_ids: Iterable[int] | None = None,
    ignore_eos: bool = False,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_tokens: int | None = None,
    logprobs: int | None = None,
    request_id: str | None = None,
    priority: int | None = None,
    slo_class: str | None = None,
) -> pb.GenerateRequest:
    """The GenerateRequest for `generate`'s keyword arguments; None (or False) leaves a field unset.

    Checks only what the SDK can know (one input, types, message keys), raising InvalidArgument
    naming the argument; ranges are the server's to check, so that one place decides them.
    """
    inputs = [name for name, value in (("prompt", prompt), ("messages", messages),
                                       ("token_ids", token_ids)) if value is not None]
    if len(inputs) != 1:
        raise errors.InvalidArgument(
            "give exactly one of prompt, messages or token_ids"
            + (f" (got {', '.join(inputs)})" if inputs else ""))
    request = pb.GenerateRequest()
    if prompt is not None:
        _assign(request, "prompt", prompt)
    elif messages is not None:
        request.messages.SetInParent()          # selects the oneof case even for an empty list
        for i, message in enumerate(_items("messages", messages)):
            request.messages.messages.append(_chat_message(i, message))
    else:
        request.token_ids.SetInParent()
        _extend(request.token_ids.ids, "token_ids", _items("token_ids", token_ids))

    sampling = pb.SamplingParams()
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                        ("repetition_penalty", repetition_penalty), ("min_tokens", min_tokens),
                        ("logprobs", logprobs)):
        if value is not None:
            _assign(sampling, name, value)
    if stop is not None:
        _extend(sampling.stop, "stop", [stop] if isinstance(stop, str) else _items("stop", stop))
    if stop_token_ids is not None:
        _extend(sampling.stop_token_ids, "stop_token_ids", _items("stop_token_ids", stop_token_ids))
    if ignore_eos:
        _assign(sampling, "ignore_eos", ignore_eos)
    if sampling.ListFields():                   # all unset: `sampling` itself stays unset
        request.sampling.CopyFrom(sampling)

    for name, value in (("request_id", request_id), ("priority", priority), ("slo_class", slo_class)):
        if value is not None:
            _assign(request, name, value)
    return request


def _assign(message: Any, field: str, value: Any) -> None:
    try:
        setattr(message, field, value)
    except (TypeError, ValueError) as e:
        raise errors.InvalidArgument(f"{field}: {e}") from e


def _extend(repeated: Any, field: str, values: list[Any]) -> None:
    try:
        repeated.extend(values)
    except (TypeError, ValueError) as e:
        raise errors.InvalidArgument(f"{field}: {e}") from e


def _items(field: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise errors.InvalidArgument(f"{field}: expected a list, got {type(value).__name__}")
    return list(value)


def _chat_message(index: int, message: Any) -> pb.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise errors.InvalidArgument(f"{where}: expected a dict, got {type(message).__name__}")
    unknown = sorted(set(message) - set(CHAT_MESSAGE_KEYS))
    if unknown:
        raise errors.InvalidArgument(
            f"{where}: unsupported keys {', '.join(map(repr, unknown))}; supported: "
            f"{', '.join(CHAT_MESSAGE_KEYS)}")
    for key in CHAT_MESSAGE_KEYS:
        if not isinstance(message.get(key), str):
            raise errors.InvalidArgument(f"{where}.{key}: expected a string")
    return pb.ChatMessage(role=message["role"], content=message["content"])


def enum_label(enum: EnumDescriptor, number: int) -> str:
    """The lower-case short name of an enum value: FINISH_REASON_STOP -> "stop".

    A value this SDK's stubs do not know (a newer server) reads "unknown".
    """
    value = enum.values_by_number.get(number)
    if value is None:
        return "unknown"
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"   # FinishReason -> FINISH_REASON_
    return value.name.removeprefix(prefix).lower()


def to_usage(usage: pb.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 queue_time_ms=usage.queue_time_ms, ttft_ms=usage.ttft_ms, e2e_ms=usage.e2e_ms)


def to_chunk(response: pb.GenerateResponse) -> Chunk:
    finished = response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return Chunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=tuple(response.token_ids),
        finish_reason=enum_label(pb.FinishReason.DESCRIPTOR, response.finish_reason) if finished else None,
        usage=to_usage(response.usage) if response.HasField("usage") else None,
        logprobs=tuple(TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                       for lp in response.logprobs),
    )


def model_info_to_dict(info: pb.ModelInfo) -> dict[str, Any]:
    """Every ModelInfo field by name, set or not; enums as short names ("split")."""
    out: dict[str, Any] = {}
    for field in info.DESCRIPTOR.fields:
        value = getattr(info, field.name)
        if field.enum_type is not None:
            value = enum_label(field.enum_type, value)
        out[field.name] = value
    return out


class _Joiner:
    """Joins a stream's chunks into a Completion."""

    def __init__(self) -> None:
        self.request_id = ""
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.request_id = chunk.request_id or self.request_id
        self.texts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.last = chunk

    def completion(self) -> Completion:
        last = self.last
        if last is None or last.finish_reason is None:
            raise errors.Internal("the server ended the stream without a finish reason")
        return Completion(request_id=self.request_id, text="".join(self.texts),
                          token_ids=tuple(self.token_ids), finish_reason=last.finish_reason,
                          usage=last.usage or Usage(0, 0, 0.0, 0.0, 0.0), logprobs=tuple(self.logprobs))


def _reattacher(stub: pb_grpc.GenerationStub, window_s: float, timeout: float | None) -> Reattacher:
    """The request's id is learnt from the gateway (it accepted the request), never from the request sent."""
    return Reattacher(lambda attach, left: stub.Attach(attach, timeout=left), window_s,
                      None if timeout is None else time.monotonic() + timeout)


# ---------------------------------------------------------------------------------------------
# Blocking client
# ---------------------------------------------------------------------------------------------

class Stream:
    """The chunks of one Generate call, as an iterator. Closing it cancels the request.

    Close it with close(), a `with` block, or by dropping the last reference to it; breaking out
    of a `for` loop alone leaves the request running until one of those happens.
    """

    def __init__(self, call: Any, target: str | None = None, reattacher: Reattacher | None = None) -> None:
        self._call = call           # grpc's call object: an iterator of GenerateResponse
        self._target = target       # named in errors
        self._reattacher = reattacher   # None: a lost stream is an error
        self._closed = False        # closed by the caller: iteration ends quietly
        self._done = False          # no more chunks will come
        self._closing = threading.Event()   # wakes a re-attach backoff when the caller closes

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        while not self._done:
            try:
                response = next(self._call)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                if not self._closed and self._reattach(e):
                    continue
                self._done = True
                if self._closed:                # close() from another thread while we waited
                    raise StopIteration from None
                raise errors.from_rpc_error(e, self._target) from e
            except BaseException:               # KeyboardInterrupt while waiting
                self.close()
                raise
            if self._reattacher is not None:
                self._reattacher.received(response)
            return to_chunk(response)
        raise StopIteration

    def _reattach(self, error: grpc.RpcError) -> bool:
        """After a lost connection: wait, then follow the request again with an Attach call."""
        r = self._reattacher
        if r is None:
            return False
        r.learn_id(self._call.initial_metadata())
        delay = r.delay(error.code(), time.monotonic())
        if delay is None or self._closing.wait(delay):
            return False
        self._call = r.call(time.monotonic())
        if self._closed:                        # closed while the new call was made
            self._call.cancel()
        return True

    def close(self) -> None:
        """Cancel the request if it is still running; iteration then stops."""
        self._closed = True
        self._closing.set()
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_call", None) is not None:
            try:
                self.close()
            except Exception:                       # interpreter shutdown: nothing left to cancel
                pass


class Client:
    """A blocking client of one duoserve gateway.

    `timeout` (seconds) bounds every call unless the call gives its own; for streams it bounds
    the whole stream. `tls`: None (plaintext), True (TLS against the system's roots), a CA file's
    path (e.g. the stack's self-signed certificate) or grpc.ChannelCredentials; `server_name` when
    the certificate names another host than the target's; `api_key` is sent as
    `authorization: Bearer <key>` on every call (the gateway's `--api-key`). `credentials` is the
    older spelling of `tls=grpc.ChannelCredentials`. Nothing is read from the environment. A stream
    whose gateway goes away mid-request (UNAVAILABLE) re-attaches to the request for up to
    `reattach_s` seconds (0: raise Unavailable at once instead).
    """

    def __init__(self, target: str, *, timeout: float | None = None, tls: Tls = None,
                 api_key: str | None = None, server_name: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, reattach_s: float = DEFAULT_WINDOW_S) -> None:
        self.target = with_default_port(target)   # "host" means host:50051
        self.timeout = timeout
        self.reattach_s = reattach_s
        self._channel = open_channel(self.target, tls=credentials or tls, server_name=server_name, token=api_key,
                                     options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        token_ids: Iterable[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        min_tokens: int | None = None,
        logprobs: int | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        slo_class: str | None = None,
        timeout: float | None = None,
    ) -> Stream:
        """Start a request and return its chunks as they come (see Stream).

        Give exactly one of `prompt` (text), `messages` ([{"role": ..., "content": ...}], rendered
        with the model's chat template) or `token_ids`. Sampling arguments left None take the
        server's defaults. `logprobs=k` (0 to 20) makes every chunk carry each token's logprob and
        the k most likely alternatives (Chunk.logprobs). `timeout` overrides the client's for this
        request.
        """
        request = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
            min_tokens=min_tokens, logprobs=logprobs, request_id=request_id,
            priority=priority, slo_class=slo_class)
        timeout = self._timeout(timeout)
        return Stream(self._stub.Generate(request, timeout=timeout), self.target,
                      _reattacher(self._stub, self.reattach_s, timeout))

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        token_ids: Iterable[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        min_tokens: int | None = None,
        logprobs: int | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        slo_class: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run a request to the end and return the whole output; arguments as for stream()."""
        joiner = _Joiner()
        with self.stream(
                prompt, messages=messages, token_ids=token_ids, max_tokens=max_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                min_tokens=min_tokens, logprobs=logprobs, request_id=request_id,
                priority=priority, slo_class=slo_class, timeout=timeout) as chunks:
            for chunk in chunks:
                joiner.add(chunk)
        return joiner.completion()

    def chat(self, messages: Iterable[Mapping[str, str]], **kwargs: Any) -> Completion:
        """One chat turn: `messages` ([{"role": "user", "content": ...}]) through the model's chat
        template, the assistant's reply returned; keyword arguments as for generate()."""
        return self.generate(messages=messages, **kwargs)

    def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        """The token ids the server would use for `text` as a prompt."""
        request = pb.TokenizeRequest()
        _assign(request, "text", text)
        try:
            response = self._stub.Tokenize(request, timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from e
        return list(response.token_ids)

    def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The served model and its limits: model, architecture, vocab_size, max_context,
        max_tokens, block_size, num_kv_blocks, mode ("split" or "colocated")."""
        try:
            info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from e
        return model_info_to_dict(info)

    def close(self) -> None:
        """Close the channel; running streams are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


# ---------------------------------------------------------------------------------------------
# asyncio client
# ---------------------------------------------------------------------------------------------

class AsyncStream:
    """The chunks of one Generate call, as an async iterator. Closing it cancels the request.

    Close it with close() / aclose(), an `async with` block, or by dropping the last reference;
    cancelling the task that iterates it cancels the request too.
    """

    def __init__(self, call: Any, target: str | None = None, reattacher: Reattacher | None = None) -> None:
        self._call = call           # grpc.aio's UnaryStreamCall
        self._target = target       # named in errors
        self._reattacher = reattacher   # None: a lost stream is an error
        self._closed = False        # closed by the caller: iteration ends quietly
        self._done = False          # no more chunks will come

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        while not self._done:
            try:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    self._done = True
                    break
            except grpc.RpcError as e:
                if not self._closed and await self._reattach(e):
                    continue
                self._done = True
                raise errors.from_rpc_error(e, self._target) from e
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and not (task is not None and task.cancelling()):
                    raise StopAsyncIteration from None  # close() from another task while we waited
                self.close()                            # our task was cancelled: so is the request
                raise
            if self._reattacher is not None:
                self._reattacher.received(response)
            return to_chunk(response)
        raise StopAsyncIteration

    async def _reattach(self, error: grpc.RpcError) -> bool:
        """After a lost connection: wait, then follow the request again with an Attach call."""
        r = self._reattacher
        if r is None:
            return False
        r.learn_id(await self._call.initial_metadata())
        delay = r.delay(error.code(), time.monotonic())
        if delay is None:
            return False
        await asyncio.sleep(delay)              # a close() meanwhile cancels the failed call: a no-op
        if self._closed:
            raise StopAsyncIteration
        self._call = r.call(time.monotonic())
        return True

    def close(self) -> None:
        """Cancel the request if it is still running; iteration then stops."""
        self._closed = True
        if not self._done:
            self._done = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_call", None) is not None:
            try:
                self.close()
            except Exception:                       # its event loop is already closed
                pass


class AsyncClient:
    """An asyncio client of one duoserve gateway; the same calls as Client, awaited.

    The channel is opened on first use, in the running event loop, and belongs to that loop:
    use one AsyncClient per loop. `tls`, `server_name`, `api_key`: as Client's.
    """

    def __init__(self, target: str, *, timeout: float | None = None, tls: Tls = None,
                 api_key: str | None = None, server_name: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, reattach_s: float = DEFAULT_WINDOW_S) -> None:
        self.target = with_default_port(target)   # "host" means host:50051
        self.timeout = timeout
        self.reattach_s = reattach_s
        self._connect = {"tls": credentials or tls, "server_name": server_name, "token": api_key,
                         "options": CHANNEL_OPTIONS}
        channel_credentials(credentials or tls)   # a bad CA path fails here, not at the first call
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        token_ids: Iterable[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        min_tokens: int | None = None,
        logprobs: int | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        slo_class: str | None = None,
        timeout: float | None = None,
    ) -> AsyncStream:
        """Start a request; `async for chunk in client.stream(...)`. Arguments as Client.stream()."""
        request = build_generate_request(
            prompt, messages=messages, token_ids=token_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
            min_tokens=min_tokens, logprobs=logprobs, request_id=request_id,
            priority=priority, slo_class=slo_class)
        timeout, stub = self._timeout(timeout), self._get_stub()
        return AsyncStream(stub.Generate(request, timeout=timeout), self.target,
                           _reattacher(stub, self.reattach_s, timeout))

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        token_ids: Iterable[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        stop_token_ids: Iterable[int] | None = None,
        ignore_eos: bool = False,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        min_tokens: int | None = None,
        logprobs: int | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        slo_class: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run a request to the end and return the whole output; arguments as Client.stream()."""
        joiner = _Joiner()
        async with self.stream(
                prompt, messages=messages, token_ids=token_ids, max_tokens=max_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                min_tokens=min_tokens, logprobs=logprobs, request_id=request_id,
                priority=priority, slo_class=slo_class, timeout=timeout) as chunks:
            async for chunk in chunks:
                joiner.add(chunk)
        return joiner.completion()

    async def chat(self, messages: Iterable[Mapping[str, str]], **kwargs: Any) -> Completion:
        """One chat turn, as Client.chat."""
        return await self.generate(messages=messages, **kwargs)

    async def tokenize(self, text: str, *, timeout: float | None = None) -> list[int]:
        """The token ids the server would use for `text` as a prompt."""
        request = pb.TokenizeRequest()
        _assign(request, "text", text)
        try:
            response = await self._get_stub().Tokenize(request, timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from e
        return list(response.token_ids)

    async def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The served model and its limits, as Client.model_info()."""
        try:
            info = await self._get_stub().GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e, self.target) from e
        return model_info_to_dict(info)

    async def close(self) -> None:
        """Close the channel; running streams are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_stub(self) -> pb_grpc.GenerationStub:
        loop = asyncio.get_running_loop()       # RuntimeError outside a coroutine
        if self._stub is None:
            self._channel = open_aio_channel(self.target, **self._connect)
            self._stub = pb_grpc.GenerationStub(self._channel)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this AsyncClient was first used in another event loop; "
                               "create one AsyncClient per event loop")
        return self._stub

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout
