"""The HTTP API's key check (as vLLM's `--api-key`): a plain ASGI middleware in front of every route.

A request's life here:
  open      /health and /metrics (probes and scrapers carry no key, as with vLLM), and CORS
            preflights (OPTIONS)
  checked   everything else (/v1/*, /tokenize, /detokenize; vLLM leaves the last two open, we do
            not: tokenizing costs the gateway's event loop) needs `Authorization: Bearer <key>`
  refused   401 with OpenAI's error body (type AuthenticationError), as every other error of the
            API; the route never runs

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would wrap every streamed response
and break the routes' own detection of a client that went away.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

from services.gateway.openai_protocol import error_body

OPEN_PATHS = frozenset({"/health", "/metrics"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ApiKeyMiddleware:
    def __init__(self, app: Callable, api_key: str) -> None:
        if not api_key:
            raise ValueError("ApiKeyMiddleware needs a non-empty key")
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS \
                or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(401, "AuthenticationError", "this server needs an API key: send "
                                     "`Authorization: Bearer <key>` (the OpenAI client's api_key)")).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)
