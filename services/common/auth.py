"""Bearer-token authentication for every gRPC server of the stack: one check, two interceptors.

A call's life here:
  open      grpc.health.v1 and reflection (methods under /grpc.) pass untouched: the supervisor,
            container health checks and load balancers probe without credentials
  checked   any other method needs `authorization: Bearer <token>` with one of the server's tokens
            (compared in constant time)
  refused   UNAUTHENTICATED, with a message saying what to send; the handler never runs

`BearerAuth` is for the thread-pool servers (workers, orchestrator), `AsyncBearerAuth` for the
gateway's grpc.aio server (its API key). A server without tokens gets no interceptor at all.
"""
from __future__ import annotations

import hmac
from typing import Any, Callable, Iterable

import grpc

OPEN_PREFIX = "/grpc."       # grpc.health.v1.Health, grpc.reflection.*


class _Check:
    """Which calls pass: open methods, or a bearer token among `tokens`."""

    def __init__(self, tokens: Iterable[str], hint: str) -> None:
        self.expected = tuple(f"Bearer {t}".encode() for t in tokens if t)
        if not self.expected:
            raise ValueError("an auth interceptor needs at least one non-empty token")
        self.hint = hint

    def allows(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_PREFIX):
            return True
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        # Every token compared, so the time taken does not say which one came close.
        return sum(hmac.compare_digest(given_bytes, e) for e in self.expected) > 0

    def message(self, details: grpc.HandlerCallDetails) -> str:
        return f"{details.method} needs `authorization: Bearer <token>`: {self.hint}"


def _refusal(handler: grpc.RpcMethodHandler, refuse: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the method's (a streaming method refused by a streaming handler)."""
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse)


class BearerAuth(grpc.ServerInterceptor):
    """For grpc.server (thread pool): refuses every non-health call without one of `tokens`."""

    def __init__(self, tokens: Iterable[str], hint: str) -> None:
        self.check = _Check(tokens, hint)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if self.check.allows(details):
            return continuation(details)
        handler = continuation(details)
        if handler is None:          # not served here: UNIMPLEMENTED says so (the SDK names the wrong port)
            return None
        message = self.check.message(details)

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return _refusal(handler, refuse)


class AsyncBearerAuth(grpc.aio.ServerInterceptor):
    """For grpc.aio.server: the same check, refusing with UNAUTHENTICATED."""

    def __init__(self, tokens: Iterable[str], hint: str) -> None:
        self.check = _Check(tokens, hint)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if self.check.allows(details):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:          # not served here: UNIMPLEMENTED
            return None
        message = self.check.message(details)

        if handler.unary_stream is not None:
            async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield                                   # an async generator, as the method's kind
            return grpc.unary_stream_rpc_method_handler(refuse_stream, handler.request_deserializer,
                                                        handler.response_serializer)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                   handler.response_serializer)


def interceptors(tokens: Iterable[str], hint: str) -> list[grpc.ServerInterceptor]:
    """[BearerAuth] when any token is set, else [] (a server open to every local caller)."""
    tokens = [t for t in tokens if t]
    return [BearerAuth(tokens, hint)] if tokens else []
