"""A stack's secret and the other credentials around it (pure: no grpc, no redis).

The secret's life:
  made      `duoserve up` makes one at the stack's first start (32 random bytes, URL-safe) in
            <stack dir>/secret, mode 0600 inside the 0700 stack dir; later starts reuse it, `down`
            keeps it (delete the file to rotate it)
  handed    to the processes by environment only (DUOSERVE_SECRET, or a file named by
            DUOSERVE_SECRET_FILE), never on a command line; the stack's Redis gets it as its
            `requirepass` (a 0600 config file) and every client in the Redis URL
            (redis://:SECRET@host:port/0, also in the environment)
  used      a worker's control service and the orchestrator's Admin API want
            `authorization: Bearer <secret>`; `duoctl`, `duoserve status`, the supervisor and the
            benchmarks read it from the file (or the state file) of a stack on this machine
  shown     never: a URL that carries a password is printed and logged through `redact_url`
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Mapping
from urllib.parse import quote, unquote, urlsplit, urlunsplit

SECRET_FILE = "secret"                  # in the stack's directory
SECRET_ENV = "DUOSERVE_SECRET"          # the stack's secret, handed to its processes
SECRET_FILE_ENV = "DUOSERVE_SECRET_FILE"            # ... or the path of a file holding it
REDIS_PASSWORD_FILE_ENV = "DUOSERVE_REDIS_PASSWORD_FILE"   # a file with the password REDIS_URL lacks
API_KEY_ENV = "DUOSERVE_API_KEY"        # the public API's key (as vLLM's VLLM_API_KEY / --api-key)
ADMIN_TOKEN_ENV = "DUOSERVE_ADMIN_TOKEN"


class CredentialError(ValueError):
    """A secret file that is missing, empty or readable by others: the message says what to fix."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def ensure_secret(stack_dir: Path) -> str:
    """The stack's secret: read from <stack_dir>/secret, made (mode 0600) when there is none."""
    path = Path(stack_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret_file(path)
    with os.fdopen(fd, "w") as f:
        f.write(new_secret() + "\n")
    return read_secret_file(path)


def read_secret_file(path: Path | str, private: bool = True) -> str:
    """A secret from a file; `private`: only its owner may read it (as ssh's keys), refused otherwise.
    (Not for files the operator hands a process by *_FILE: a container's secret mount may need to be
    readable by the image's user.)"""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as e:
        raise CredentialError(f"cannot read the secret file {path}: {e.strerror or e}") from None
    if private and mode & 0o077:
        raise CredentialError(f"the secret file {path} is readable by others (mode {mode & 0o777:o}); "
                              f"`chmod 600 {path}`")
    if not text:
        raise CredentialError(f"the secret file {path} is empty")
    return text


def stack_secret(stack_dir: Path) -> str | None:
    """The secret of a stack on this machine, or None when it has none (started with --no-auth)."""
    path = Path(stack_dir) / SECRET_FILE
    return read_secret_file(path) if path.exists() else None


def secret_of(secret_file: str | Path | None) -> str | None:
    """The secret a stack's state file points to (`StackState.secret_file`), or None without one."""
    return read_secret_file(secret_file) if secret_file else None


def secret_from_env(env: Mapping[str, str], name: str = SECRET_ENV) -> str:
    """`name` from the environment (set but empty: none, whatever else the environment says), else the
    contents of the file `<name>_FILE` names, else ""."""
    if name in env:
        return env[name]
    path = env.get(f"{name}_FILE")
    return read_secret_file(path, private=False) if path else ""


def redis_url_from_env(env: Mapping[str, str], url: str | None) -> str | None:
    """REDIS_URL with the password of DUOSERVE_REDIS_PASSWORD_FILE put in, when it has none
    (compose hands the password as a secret file rather than in the URL)."""
    path = env.get(REDIS_PASSWORD_FILE_ENV)
    if not url or not path or url_password(url):
        return url
    return with_password(url, read_secret_file(path, private=False))


def with_password(url: str, password: str) -> str:
    """redis://host:port/0 -> redis://:PASSWORD@host:port/0 (the default user, as `requirepass`)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def url_password(url: str | None) -> str | None:
    """The password a URL carries, if any."""
    if not url:
        return None
    password = urlsplit(url).password
    return unquote(password) if password else None


def redact_url(url: str | None) -> str | None:
    """The URL with its password replaced by ***, for logs, errors and `duoserve status`."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a call that must carry `token` (none when there is no token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
