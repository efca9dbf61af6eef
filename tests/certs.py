"""Self-signed certificates for the TLS tests, made with the `openssl` command line (no Python package)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


def self_signed(directory: Path, name: str = "localhost", ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """(certificate, key) for `name` and `ips`, valid for a day; the key mode 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    alt = ",".join([f"DNS:{name}", *(f"IP:{ip}" for ip in ips)])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={alt}"], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key
