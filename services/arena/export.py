"""What the arena tells a worker over its Unix socket, and the socket's same-user checks.

One JSON document per connection, never pickle: segment names (cpu) or CUDA IPC handles as base64
fields (cuda, see services.arena.cuda_export), the weights manifest, the KV layout and the model's
config. Both ends check the other with SO_PEERCRED (same uid, else the
connection is closed), and the socket lives in a directory only its user can enter.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from services.arena.cuda_export import CudaExport
from services.common.weights_pack import Manifest
from services.engine.model_config import ModelConfig, RopeScaling

VERSION = 1
MAX_DOCUMENT_BYTES = 16 << 20          # a client reads at most this much (a 1000-layer manifest is ~1 MB)
_UCRED = struct.Struct("3i")           # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV pool's shape, as `services.engine.kv_cache.KVCacheSpec` without torch."""

    num_layers: int
    num_blocks: int
    block_size: int                    # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str                         # a key of services.engine.llm_engine.DTYPES


@dataclass(frozen=True, slots=True)
class ArenaExport:
    """Everything a worker needs to attach to the arena's memory."""

    arena_pid: int                     # owner of the segments (also encoded in their names)
    weights_segment: str               # /dev/shm name: every weight, packed (services.common.weights_pack); cuda: ""
    weights_manifest: Manifest         # name -> offset, shape, dtype, nbytes inside the weights buffer
    kv_segment: str                    # /dev/shm name: the KV pool, laid out as KVCacheSpec.shape; cuda: ""
    kv_spec: KVLayout                  # how kv_segment is laid out
    model_dir: str                     # HF-format checkpoint directory (tokenizer, config.json)
    model_config_path: str             # model_dir/config.json, for people reading the document
    model_config: dict[str, Any]       # ModelConfig the weights were fused for (asdict)
    version: int = VERSION             # bumped on incompatible changes; a client refuses others
    device: str = "cpu"                # where the memory lives: "cpu" (segments) or "cuda" (IPC handles)
    cuda: CudaExport | None = None     # device "cuda": the weights and KV allocations (added within version 1)
    memory_id: str = ""                # random, made with the memory: the same across re-opens (cpu), new with
                                       # new memory (always on cuda); "" from an arena before this field

    def to_json(self) -> bytes:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["kv_spec"] = asdict(self.kv_spec)
        data["cuda"] = None if self.cuda is None else self.cuda.to_dict()
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "ArenaExport":
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError(f"arena answered protocol version {data.get('version') if isinstance(data, dict) else '?'}"
                             f", this worker speaks {VERSION}: restart the stack with one version")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["kv_spec"] = KVLayout(**data["kv_spec"])
        if data.get("device", "cpu") not in ("cpu", "cuda"):
            raise ValueError(f"arena memory on unknown device {data['device']!r}")
        if data.get("device") == "cuda":
            data["cuda"] = CudaExport.from_dict(data.get("cuda"))
        else:
            data["cuda"] = None
        return cls(**data)

    def config(self) -> ModelConfig:
        return model_config_from_dict(self.model_config)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return asdict(config)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    kwargs = {k: v for k, v in data.items() if k in known}
    kwargs["rope_scaling"] = RopeScaling(**kwargs.get("rope_scaling", {}))
    kwargs["eos_token_ids"] = tuple(kwargs.get("eos_token_ids", ()))
    return ModelConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- socket

def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) mode 0700; refuse a directory others can enter or that is not ours."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass                        # made by a concurrent process: checked below like any other
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory (a symlink?): refusing to put the arena socket there")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})")
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}: other users could reach the arena "
                              "socket; chmod 700 it or pick another --socket")
    return path
