"""How a client opens a gRPC channel to a duoserve server: TLS or not, a bearer token on every call.

  tls=None / False       plaintext (a stack on this machine, or behind a TLS-terminating proxy)
  tls=True               TLS, the server's certificate checked against the system's roots
  tls="ca.pem"           TLS, checked against this CA (or this self-signed certificate itself)
  tls=ChannelCredentials as given (client certificates, ...)
  server_name            the name the certificate must carry when it is not the target's host
                         (e.g. a certificate for duoserve.example.com reached as 127.0.0.1)
  token                  sent as `authorization: Bearer <token>` on every call: the gateway's API
                         key (`--api-key`), or the stack's secret for the Admin API and the workers

Used by the SDK, `duoctl`, the supervisor's health checks and the benchmarks alike.
"""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Union

import grpc

Tls = Union[None, bool, str, Path, grpc.ChannelCredentials]


def channel_credentials(tls: Tls) -> grpc.ChannelCredentials | None:
    """None for plaintext, else the credentials `tls` stands for."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (str, Path)):
        try:
            return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
        except OSError as e:
            raise ValueError(f"tls: cannot read the CA file {tls}: {e.strerror or e}") from None
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    raise TypeError(f"tls: expected None, a bool, a CA file path or grpc.ChannelCredentials, got {type(tls).__name__}")


def certificate_name(cert_path: str | Path) -> str | None:
    """The first name a PEM certificate is for (a DNS or IP subject alternative name, else its CN):
    what a client checking it against the certificate itself must ask for."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert_path))      # noqa: SLF001: the stdlib's only PEM reader
    except (OSError, ssl.SSLError, AttributeError):
        return None
    for kind, value in decoded.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            return value
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def channel_options(server_name: str | None, options: tuple[tuple[str, Any], ...] = ()) -> list[tuple[str, Any]]:
    out = list(options)
    if server_name:
        out.append(("grpc.ssl_target_name_override", server_name))
    return out


class _Token(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self.metadata,
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _AioToken:
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# Two classes: grpc.aio files an interceptor under the first kind it is an instance of, only.
class _AioUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def open_channel(target: str, *, tls: Tls = None, server_name: str | None = None, token: str | None = None,
                 options: tuple[tuple[str, Any], ...] = ()) -> grpc.Channel:
    """A blocking channel to `target` (see the module's docstring for the arguments)."""
    credentials = channel_credentials(tls)
    opts = channel_options(server_name, options)
    channel = (grpc.secure_channel(target, credentials, options=opts) if credentials is not None
               else grpc.insecure_channel(target, options=opts))
    return grpc.intercept_channel(channel, _Token(token)) if token else channel


def open_aio_channel(target: str, *, tls: Tls = None, server_name: str | None = None, token: str | None = None,
                     options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
    """The asyncio channel, as `open_channel`; create it in the event loop that uses it."""
    credentials = channel_credentials(tls)
    opts = channel_options(server_name, options)
    interceptors = [_AioUnaryToken(token), _AioStreamToken(token)] if token else None
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
