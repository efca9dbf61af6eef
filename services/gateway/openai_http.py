"""The gateway's OpenAI-compatible HTTP API (as vLLM's OpenAI server), over the same Frontend as gRPC.

  POST /v1/completions, /v1/chat/completions   streaming (SSE) or not; n choices; logprobs
  GET  /v1/models                             the served model
  POST /tokenize, /detokenize                 vLLM's shapes
  GET  /health                                200 while serving, 503 while starting, draining or
                                              while the stack's Redis does not answer
  GET  /metrics                               the whole stack's Prometheus series (stack_metrics)

Errors have OpenAI's body {"error": {message, type, param, code}} with vLLM's types: 400 bad input
(the field in `param`), 404 unknown model or route, 429 full queue, 503 not serving, 500 otherwise.
It runs in the gateway's event loop beside the gRPC server (`serve_http`): no thread, no process.
With `--api-key` every route but /health and /metrics wants `Authorization: Bearer <key>`
(`http_auth`); with `--tls-cert/--tls-key` it serves HTTPS.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from services.common.redis_retry import UNREACHABLE
from services.common.tls import TlsFiles
from services.engine.sampling_params import SamplingParams
from services.gateway.errors import GatewayError, InvalidInput, NotReady
from services.gateway.frontend import Frontend, GenerateInput
from services.gateway.http_auth import ApiKeyMiddleware
from services.gateway.http_input import BodyTooLarge, checked_route
from services.gateway.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                              TokenizeRequest, error_body, error_of)
from services.gateway.openai_serving import Plan, check_model, complete, plan_chat, plan_completion, start_stream
from services.gateway.stack_metrics import render

T = TypeVar("T")


@dataclass
class HttpState:
    """What the routes read besides the frontend; `serving` is flipped by the gateway's main."""

    frontend: Frontend
    peer_metrics: tuple[tuple[str, str], ...] = ()
    serving: bool = False                  # False while starting and while draining
    api_key: str = ""                      # non-empty: requests need it (services.gateway.http_auth)
    tls: TlsFiles | None = None            # serve HTTPS


class _EventStream(StreamingResponse):
    """SSE whose body is always closed: a client gone mid-stream cancels its choices at once (the
    body's cleanup is synchronous, so the cancelled send cannot skip it)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _error(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":         # loc is ("body", character offset)
        at = first.get("loc", ("body", "?"))[-1]
        why = (first.get("ctx") or {}).get("error", "")
        return _error(400, error_body(400, "BadRequestError", f"body: not valid JSON at character {at} ({why})",
                                      "body"))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return _error(400, error_body(400, "BadRequestError", f"{where}: {first.get('msg', 'invalid request')}", param))


DISCONNECT_POLL_S = 0.25      # how often a request still without a response checks for its client
CLIENT_GONE = 499             # nobody reads it (nginx's "client closed request")


async def _answer(request: Request, frontend: Frontend, plan: Plan, stream: bool) -> Response:
    """The response; a client that disconnects before it starts (a whole non-streaming request, a
    stream before its first token) cancels its choices, which free their KV blocks."""
    if stream:
        events = await _unless_disconnected(request, start_stream(frontend, plan))
        return events if isinstance(events, Response) else _EventStream(events, media_type="text/event-stream")
    body = await _unless_disconnected(request, complete(frontend, plan))
    return body if isinstance(body, Response) else JSONResponse(body)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    task = asyncio.ensure_future(work)
    while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
            task.cancel()            # complete()/start_stream() cancel every choice on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return Response(status_code=CLIENT_GONE)
    return task.result()


def _models(frontend: Frontend) -> dict:
    name = check_model(frontend, None)
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": int(time.time()), "owned_by": "duoserve", "root": name,
        "parent": None, "max_model_len": frontend.info.max_model_len, "permission": []}]}


async def _tokenize(frontend: Frontend, body: TokenizeRequest) -> dict:
    check_model(frontend, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidInput("prompt: give exactly one of prompt and messages")
    if body.messages is not None:
        messages = tuple((m.role, m.text(i)) for i, m in enumerate(body.messages))
        ids = await frontend.prompt_ids(GenerateInput("", SamplingParams(), messages=messages))
    else:
        ids = await frontend.tokenize(body.prompt, "prompt", body.add_special_tokens)
    return {"count": len(ids), "max_model_len": frontend.info.max_model_len, "tokens": ids, "token_strs": None}


def _detokenize(frontend: Frontend, body: DetokenizeRequest) -> dict:
    check_model(frontend, body.model)
    vocab, context = frontend.info.vocab_size, frontend.info.max_model_len
    if len(body.tokens) > context:      # decoding holds the GIL: at most a context's worth, a few ms
        raise InvalidInput(f"tokens: {len(body.tokens)} ids; at most {context} (the model's context)")
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidInput(f"tokens: {bad} is outside the vocabulary [0, {vocab})")
    return {"prompt": frontend.tokenizer.decode(body.tokens)}


def build_app(state: HttpState) -> FastAPI:
    app = FastAPI(title="duoserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = checked_route(state.frontend.config.max_body_bytes)   # UTF-8 named, size bounded
    app.add_exception_handler(BodyTooLarge, lambda _r, e: _error(
        413, error_body(413, "BadRequestError", str(e), "body")))
    app.add_exception_handler(RequestValidationError, lambda _r, e: _validation_error(e))
    app.add_exception_handler(HTTPException, lambda _r, e: _error(
        e.status_code, error_body(e.status_code, "NotFoundError" if e.status_code == 404 else "BadRequestError",
                                  f"{e.detail}")))
    app.add_exception_handler(GatewayError, lambda _r, e: _error(*error_of(e)))
    app.add_exception_handler(Exception, lambda _r, e: _error(*error_of(e)))     # 500, logged
    frontend = state.frontend

    def ready() -> None:
        if not frontend.redis_ok:
            raise NotReady(UNREACHABLE)
        if not state.serving:
            raise NotReady("the gateway is not serving (starting or draining); retry shortly")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ready()
        return await _answer(request, frontend, await plan_completion(frontend, body), body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        ready()
        return await _answer(request, frontend, await plan_chat(frontend, body), body.stream)

    @app.get("/v1/models")
    async def models() -> dict:
        return _models(frontend)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        return await _tokenize(frontend, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return _detokenize(frontend, body)

    @app.get("/health")
    async def health() -> Response:
        if not state.serving:
            why = UNREACHABLE if not frontend.redis_ok else "not serving (starting or draining)"
            return _error(503, error_body(503, "ServiceUnavailableError", why))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await render(frontend.metrics.registry, state.peer_metrics)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    return app


class _Server(uvicorn.Server):
    """uvicorn in the gateway's loop: the gateway owns the signals (uvicorn's own handlers would
    replace them), and stops it by setting `should_exit`."""

    def capture_signals(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def bind(host: str, port: int) -> socket.socket:
    """Listen now, so a port in use fails the start loudly (the supervisor relaunches elsewhere)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (HTTP API): {e}") from e
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def start_http(state: HttpState, sock: socket.socket) -> tuple[_Server, asyncio.Task]:
    """The HTTP API as a task of the running loop; stop it with `server.should_exit = True`."""
    app = build_app(state)
    tls = {"ssl_certfile": str(state.tls.cert), "ssl_keyfile": str(state.tls.key)} if state.tls else {}
    config = uvicorn.Config(ApiKeyMiddleware(app, state.api_key) if state.api_key else app, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5, **tls)
    server = _Server(config)
    return server, asyncio.create_task(server.serve(sockets=[sock]))
