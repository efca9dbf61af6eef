"""The HTTP API's request bodies before FastAPI parses them: size, UTF-8 and lone surrogates.

FastAPI answers a body that is not UTF-8 with a bare "There was an error parsing the body", and
accepts JSON's `\\ud800` escapes, handing the tokenizer a string it cannot encode (a 500). Every
route of the API is a `CheckedRoute`: the body is read once (at most `max_body_bytes`, else 413),
and a string that is not text is refused with 400 naming its field (`messages.0.content`), as
the gRPC API does (`services.common.grpc_input`). Valid bodies cost one UTF-8 decode and a byte
search; only a suspect body is parsed here to find the field.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import Request, Response
from fastapi.routing import APIRoute

from services.gateway.errors import InvalidInput


class BodyTooLarge(Exception):
    """A request body over the gateway's limit (413)."""


def first_bad_string(value: Any, path: str = "") -> str | None:
    """'<path>: ...' for the first string (or key) in parsed JSON that is not valid Unicode text
    (a lone surrogate: an escape like \\ud800, or an invalid byte read with surrogateescape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"{path or 'body'}: not valid UTF-8 (a bad byte or a lone surrogate at character {e.start}); "
                    "strings must be UTF-8 text")
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if first_bad_string(key, where) is not None:
                return f"{path or 'body'}: a key is not valid UTF-8 text"
            if (found := first_bad_string(item, where)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := first_bad_string(item, f"{path}.{i}" if path else str(i))) is not None:
                return found
    return None


def check_body(body: bytes) -> None:
    """InvalidInput naming the field when a JSON body holds text that is not UTF-8."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        try:
            parsed = json.loads(body.decode("utf-8", errors="surrogateescape"))
        except ValueError:
            raise InvalidInput(f"body: not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}); "
                               "JSON must be UTF-8") from None
        raise InvalidInput(first_bad_string(parsed) or "body: not valid UTF-8; JSON must be UTF-8") from None
    if b"\\ud" in body or b"\\uD" in body:         # a surrogate escape: lone ones are not text
        try:
            found = first_bad_string(json.loads(body))
        except ValueError:
            return                                   # not JSON: FastAPI says where
        if found is not None:
            raise InvalidInput(found)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body (cached on the request for FastAPI), refused once it passes `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"body: {declared} bytes; at most {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"body: more than {max_bytes} bytes")
        chunks.append(chunk)
    request._body = b"".join(chunks)            # what Request.body() returns from now on
    return request._body


def checked_route(max_body_bytes: int) -> type[APIRoute]:
    """A route class whose requests' bodies are bounded and checked before FastAPI parses them."""
    class CheckedRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handle = super().get_route_handler()

            async def checked(request: Request) -> Response:
                if request.method in ("POST", "PUT", "PATCH"):
                    check_body(await read_body(request, max_body_bytes))
                return await handle(request)
            return checked
    return CheckedRoute
