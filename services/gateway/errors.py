"""Gateway errors and the one interceptor that turns them into gRPC status codes.

Servicers and the frontend raise these; no servicer builds a status itself.
  InvalidInput -> INVALID_ARGUMENT   QueueFull -> RESOURCE_EXHAUSTED   NotReady -> UNAVAILABLE
  ModelNotFound, RequestNotFound -> NOT_FOUND   Superseded -> ABORTED
The HTTP API maps the same exceptions to OpenAI's error bodies (`services.gateway.openai_protocol`).
  anything else -> INTERNAL, with a log line (the client sees no stack trace)
  a request that does not decode (corrupt protobuf, a string that is not UTF-8) -> INVALID_ARGUMENT
  naming the field, with one log line (`services.common.grpc_input`), before the servicer runs
The HTTP API maps the same exceptions to OpenAI's error bodies (`services.gateway.openai_protocol`).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import grpc

from services.common.grpc_input import checked_aio_handler

log = logging.getLogger("duoserve.gateway")


class GatewayError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidInput(GatewayError):
    """A request field is wrong; the message names the field."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class QueueFull(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelNotFound(GatewayError):
    """The request names a model this stack does not serve (the HTTP API's `model` field)."""
    code = grpc.StatusCode.NOT_FOUND


class RequestNotFound(GatewayError):
    """Attach names a request this gateway does not hold (ended, cancelled, or never accepted here)."""
    code = grpc.StatusCode.NOT_FOUND


class Superseded(GatewayError):
    """Another call attached to the request this call was streaming; this one ends."""
    code = grpc.StatusCode.ABORTED


class NotReady(GatewayError):
    """Starting, draining, or the workers stopped answering."""
    code = grpc.StatusCode.UNAVAILABLE


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, GatewayError):
        await context.abort(error.code, str(error))
    log.exception("internal error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}; see the gateway log")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of unary and server-streaming handlers to status codes, and refuses requests
    that do not decode before any handler runs."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        return checked_aio_handler(_mapped(await continuation(details)), details.method)


def _mapped(handler: Any) -> Any:
    if handler is None:
        return None
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
    return handler


def _wrap_unary(inner: Any) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        except Exception as e:       # noqa: BLE001 - the one place errors become statuses
            if _is_abort(e):
                raise
            await _abort(context, e)
    return call


def _wrap_stream(inner: Any) -> Any:
    """Keeps the handler's kind: grpc.aio streams an async generator's yields, or runs a coroutine that
    writes with `context.write` (as the aio HealthServicer's Watch does)."""
    if not inspect.isasyncgenfunction(inner):
        return _wrap_unary(inner)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in inner(request, context):
                yield response
        except Exception as e:       # noqa: BLE001
            if _is_abort(e):
                raise
            await _abort(context, e)
    return call


def _is_abort(error: Exception) -> bool:
    # context.abort raises grpc's own AbortError; let it through untouched.
    return type(error).__name__ == "AbortError"
