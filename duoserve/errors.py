"""Errors the duoserve SDK raises: one class per gRPC status code the servers use.

Every error carries `code`, the name of its gRPC status code ("INVALID_ARGUMENT"), and
`message`, what the server (or the SDK, for arguments it can check itself) said went wrong:

    try:
        client.generate("hi", max_tokens=0)
    except errors.InvalidArgument as e:      # also a ValueError
        print(e.code, e.message)              # INVALID_ARGUMENT max_tokens: must be at least 1 ...
    except errors.ResourceExhausted:          # queue or KV pool full: back off and retry
        ...

A status code without a class of its own (UNKNOWN, UNIMPLEMENTED, ABORTED, ...) comes as a
plain DuoserveError with that code.
"""
from __future__ import annotations

import grpc


class DuoserveError(Exception):
    """Base of every error the SDK raises."""

    code: str = "UNKNOWN"       # grpc.StatusCode name; subclasses fix it

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self):        # keep `code` through pickling (multiprocessing, logging queues)
        return _rebuild, (type(self), self.message, self.code)

    @property
    def status_code(self) -> grpc.StatusCode | None:
        """The grpc.StatusCode named by `code`, or None for a name grpc does not know."""
        return grpc.StatusCode.__members__.get(self.code)


def _rebuild(cls: type[DuoserveError], message: str, code: str) -> DuoserveError:
    return cls(message, code=code)


class InvalidArgument(DuoserveError, ValueError):
    """A request field is malformed or out of range; the message names it. Do not retry as is."""
    code = "INVALID_ARGUMENT"


class ResourceExhausted(DuoserveError):
    """The queue or the KV pool is full. Retry later, with backoff."""
    code = "RESOURCE_EXHAUSTED"


class Unavailable(DuoserveError):
    """The server cannot be reached, or is starting or draining. Retry later."""
    code = "UNAVAILABLE"


class Cancelled(DuoserveError):
    """The request was cancelled (by this client, or by the server shutting it down)."""
    code = "CANCELLED"


class DeadlineExceeded(DuoserveError):
    """The call's timeout passed before the request finished."""
    code = "DEADLINE_EXCEEDED"


class NotFound(DuoserveError):
    """The named thing (a request id, a model) does not exist."""
    code = "NOT_FOUND"


class Unauthenticated(DuoserveError):
    """The call carried no valid credentials."""
    code = "UNAUTHENTICATED"


class PermissionDenied(DuoserveError):
    """The credentials do not allow this call."""
    code = "PERMISSION_DENIED"


class FailedPrecondition(DuoserveError):
    """The server is not in a state that allows this call (for example, a drained worker)."""
    code = "FAILED_PRECONDITION"


class Internal(DuoserveError):
    """The server failed in a way the client cannot fix; its logs have the cause."""
    code = "INTERNAL"


_BY_CODE: dict[str, type[DuoserveError]] = {cls.code: cls for cls in (
    InvalidArgument, ResourceExhausted, Unavailable, Cancelled, DeadlineExceeded, NotFound,
    Unauthenticated, PermissionDenied, FailedPrecondition, Internal)}


def from_rpc_error(e: grpc.RpcError, target: str | None = None) -> DuoserveError:
    """The DuoserveError for a failed call (grpc's sync or asyncio RpcError); with the `target`
    called, a port that is not a gateway's says so."""
    status = e.code() if callable(getattr(e, "code", None)) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    details = e.details() if callable(getattr(e, "details", None)) else None
    message = details or (str(e) if status is None else f"call failed with {name}")
    if target and name == "UNIMPLEMENTED":
        message = (f"{target} is not a duoserve gateway: it does not serve duoserve.v1.Generation (a worker's, "
                   f"the arena's or the orchestrator's port?); `duoserve status` prints the gateway's ({message})")
    elif target and "http1" in message.lower():
        message = (f"{target} speaks HTTP/1, not gRPC: the OpenAI-compatible API (port 8000 by default) is "
                   f"for HTTP clients; the SDK talks to the gateway's gRPC port (50051 by default) ({message})")
    return _BY_CODE.get(name, DuoserveError)(message, code=name)
