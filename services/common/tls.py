"""TLS for the stack's servers: a certificate chain and its key, read once at start.

Who serves TLS when `--tls-cert/--tls-key` are given: the gateway (gRPC and the HTTP API, the
public surfaces) and the orchestrator (the Admin API, `duoctl`'s). The workers and the arena
listen on 127.0.0.1 only, where nobody but root can read the traffic; they are guarded by the
stack's secret instead (docs/reliability.md, "Security").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server's certificate (chain, leaf first) and its private key."""

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key)):
            if not Path(path).is_file():
                raise ValueError(f"{what} {path}: no such file")

    @staticmethod
    def of(cert: str | Path | None, key: str | Path | None) -> TlsFiles | None:
        """Both or neither: one without the other is a mistake worth stopping for."""
        if not cert and not key:
            return None
        if not (cert and key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        return TlsFiles(Path(cert), Path(key))

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())])


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TlsFiles | None) -> None:
    """Listen on `address`, with TLS when given; a port that cannot be bound raises OSError."""
    bound = (server.add_secure_port(address, tls.server_credentials()) if tls is not None
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
