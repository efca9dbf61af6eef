"""The duoserve SDK's asyncio client: AsyncClient, the same calls as duoserve.client.Client, awaited.

A request's life is the blocking client's (duoserve.client): built, streaming, finished, cancelled
(closing the stream, or cancelling the task that iterates it), lost (UNAVAILABLE mid-stream: it
re-attaches by itself for up to `reattach_s` seconds).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from duoserve import errors
from duoserve.channel import Tls, channel_credentials, open_aio_channel
from duoserve.messages import (Chunk, _assign, Completion, _Joiner, _reattacher, build_generate_request,
                               model_info_to_dict, to_chunk)
from duoserve.reattach import CHANNEL_OPTIONS, DEFAULT_WINDOW_S, Reattacher
from duoserve.targets import with_default_port
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc as pb_grpc


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
