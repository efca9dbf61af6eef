"""How a client names a stack: a gateway target (HOST, HOST:PORT) or a local stack's name.

The one owner of the conventions every command shares, client side (grpc-free, torch-free):
  - a target without a port means the gateway's default gRPC port, 50051;
  - `--name NAME` (default: $DUOSERVE_STACK, else "default") names a stack `duoserve up` started on
    this machine; its state file (under --state-dir, default $DUOSERVE_STATE_DIR) says where each of
    its processes listens;
  - both flags are accepted by every command of `duoserve` and `duoctl`, before or after the
    subcommand (`add_stack_args`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping

DEFAULT_GRPC_PORT = 50051        # the gateway's gRPC API
DEFAULT_HTTP_PORT = 8000         # its OpenAI-compatible HTTP API (where vLLM's serves)
DEFAULT_STACK = "default"
STATE_FILE = "state.json"


class StackNotFound(LookupError):
    """No stack of that name runs here, or it runs no such process; the message says what to do."""


def with_default_port(target: str) -> str:
    """ "host" -> "host:50051"; "host:port", "[v6]:port" and URLs with a scheme are kept."""
    if "://" in target or target.startswith("unix:"):
        return target
    host = target.rsplit("]", 1)[-1] if target.startswith("[") else target
    return target if ":" in host else f"{target}:{DEFAULT_GRPC_PORT}"


def default_state_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("DUOSERVE_STATE_DIR", Path.home() / ".cache" / "duoserve" / "stack"))


def add_stack_args(parser: argparse.ArgumentParser, env: Mapping[str, str], *, nested: bool = False) -> None:
    """--name and --state-dir. `nested`: on a subcommand, where they only override the top level's."""
    suppress = {"default": argparse.SUPPRESS} if nested else {}
    parser.add_argument("--name", **(suppress or {"default": env.get("DUOSERVE_STACK", DEFAULT_STACK)}),
                        help="which stack on this machine, as `duoserve up --name` (env DUOSERVE_STACK; "
                             "default: default)")
    parser.add_argument("--state-dir", type=Path, **(suppress or {"default": default_state_dir(env)}),
                        help="where stacks keep their state file and logs (env DUOSERVE_STATE_DIR)")


def read_stack_state(state_dir: Path, name: str) -> dict:
    try:
        return json.loads((Path(state_dir).expanduser() / name / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise StackNotFound(f"no stack {name!r} is running here ({state_dir}); start one with "
                            f"`duoserve up --name {name} --detach`, or give --target HOST:PORT") from None


def stack_target(state_dir: Path, name: str, process: str = "gateway") -> str:
    """HOST:PORT of one process of a local stack (the gateway: its gRPC API)."""
    state = read_stack_state(state_dir, name)
    if process == "gateway" and state.get("gateway_target"):
        return state["gateway_target"]
    for proc in state.get("processes", ()):
        if proc.get("name") == process:
            return f"127.0.0.1:{proc['port']}"
    why = " (colocated mode, or --no-orchestrator)" if process == "orchestrator" else ""
    raise StackNotFound(f"stack {name!r} runs no {process}{why}")
