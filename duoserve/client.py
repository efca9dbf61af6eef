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

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from duoserve import errors
from duoserve.channel import Tls, open_channel
from duoserve.messages import (Chunk, Completion, _assign, _Joiner, _reattacher, build_generate_request,
                               model_info_to_dict, to_chunk)
from duoserve.reattach import CHANNEL_OPTIONS, DEFAULT_WINDOW_S, Reattacher
from duoserve.targets import with_default_port
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc as pb_grpc


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
