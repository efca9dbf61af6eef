"""Requests that do not decode: INVALID_ARGUMENT naming the field, and one log line.

grpc runs a method's request deserializer before its handler. When it raises (protobuf's DecodeError
for bytes that are not the message, or for a string field that is not UTF-8), grpc.aio answers
UNKNOWN and the sync server INTERNAL, each after a traceback in the log, and neither says which
field was wrong. The interceptors here give every method a deserializer that never raises: it
returns an `Undecodable` saying what is wrong (the field's path, e.g. `sampling.stop[1]`, found by
walking the wire format with the message's descriptor), and the method's handler answers it with
INVALID_ARGUMENT before the servicer sees anything. Every gRPC server of the stack installs one:
`InputInterceptor` (sync servers: workers, orchestrator), `AioInputInterceptor` or, inside an
interceptor of its own, `checked_aio_handler` (grpc.aio: the gateway's `ErrorInterceptor`).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

log = logging.getLogger("duoserve.grpc")


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a checked deserializer returns for bytes that are not a valid request."""

    reason: str             # for the client: starts with the field's path ("request" when unknown)


class _Corrupt(Exception):
    """The wire format itself is broken: no field to name."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            break
    raise _Corrupt


def bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """'<path>: ...' for the first string field (nested messages included) that is not UTF-8;
    None when every string is valid or the wire format is too broken to tell."""
    counts: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos:pos + length], pos + length
                if pos > len(data):
                    return None
                found = _check_field(descriptor.fields_by_number.get(number), chunk, prefix, counts)
                if found:
                    return found
            else:                       # groups: none of our messages has one
                return None
    except _Corrupt:
        return None
    return None


def _check_field(field: FieldDescriptor | None, chunk: bytes, prefix: str, counts: dict[int, int]) -> str | None:
    if field is None:                   # an unknown field: protobuf keeps its bytes without reading them
        return None
    name = prefix + field.name
    if field.is_repeated:
        index = counts.get(field.number, 0)
        counts[field.number] = index + 1
        name += f"[{index}]"
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{name}: not valid UTF-8 (byte 0x{chunk[e.start]:02x} at offset {e.start}); strings must be UTF-8"
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        return bad_utf8_field(field.message_type, chunk, name + ".")
    return None


def describe(message_class: Any, data: bytes, error: Exception) -> str:
    """A client's message for `data` that `message_class` could not parse."""
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    if descriptor is not None:
        found = bad_utf8_field(descriptor, data)
        if found:
            return found
    what = descriptor.full_name if descriptor is not None else "request"
    detail = str(error).rpartition(": ")[2] or type(error).__name__
    return f"request: not a valid {what} message ({detail})"


def checked_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an `Undecodable` instead of raising."""
    if deserializer is None:            # the handler takes raw bytes: nothing to decode
        return None
    message_class = getattr(deserializer, "__self__", None)   # FromString is bound to its class

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:       # noqa: BLE001 - any failure to decode is the client's input
            return Undecodable(describe(message_class, data, e))
    return deserialize


def _log(method: str, bad: Undecodable) -> None:
    log.warning("%s: refused an undecodable request: %s", method, bad.reason)


# ------------------------------------------------------------------ sync servers
def _sync_unary(inner: Callable, method: str) -> Callable:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _log(method, request)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return inner(request, context)
    return call


def _sync_streaming(inner: Callable, method: str) -> Callable:
    def call(requests: Any, context: grpc.ServicerContext) -> Any:
        def checked() -> Any:
            for request in requests:
                if isinstance(request, Undecodable):
                    _log(method, request)
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                yield request
        return inner(checked(), context)
    return call


class InputInterceptor(grpc.ServerInterceptor):
    """For `grpc.server`: undecodable requests get INVALID_ARGUMENT naming the field."""

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _rebuild(handler, details.method, _sync_unary, _sync_streaming)



# ------------------------------------------------------------------ grpc.aio servers
def _aio_unary(inner: Callable, method: str) -> Callable:
    """Keeps the handler's kind: an async generator (streamed yields) or a coroutine (which may
    write with `context.write`, as the aio HealthServicer's Watch does)."""
    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                _log(method, request)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for response in inner(request, context):
                yield response
        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            _log(method, request)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await inner(request, context)
    return call


def _aio_streaming(inner: Callable, method: str) -> Callable:
    """Checks the request iterator it hands on (a handler reading with `context.read()` is not
    checked; none of ours does)."""
    async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            if isinstance(request, Undecodable):
                _log(method, request)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            yield request

    if inspect.isasyncgenfunction(inner):
        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in inner(checked(requests, context), context):
                yield response
        return stream

    async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await inner(checked(requests, context), context)
    return call


def checked_aio_handler(handler: grpc.RpcMethodHandler | None, method: str) -> Any:
    """A grpc.aio method handler that refuses undecodable requests (for an interceptor of its own)."""
    if handler is None or handler.request_deserializer is None:
        return handler
    return _rebuild(handler, method, _aio_unary, _aio_streaming)


class AioInputInterceptor(grpc.aio.ServerInterceptor):
    """For `grpc.aio.server`: undecodable requests get INVALID_ARGUMENT naming the field."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        return checked_aio_handler(await continuation(details), details.method)


def _rebuild(handler: grpc.RpcMethodHandler, method: str, unary: Callable, streaming: Callable) -> Any:
    """The same handler with a checked deserializer and its behaviour wrapped to refuse what failed."""
    deserialize = checked_deserializer(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, method), deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary(handler.unary_stream, method), deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(streaming(handler.stream_unary, method), deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, method), deserialize, serialize)
