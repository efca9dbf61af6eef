"""Attach a worker to the arena: the weights and the KV pool as zero-copy tensors over shared memory.

  connect   the arena's Unix socket, retried until `timeout` (the arena may still be loading);
            the arena must run as our uid (SO_PEERCRED), as it checks us
  read      one JSON `ArenaExport` (bounded size; never pickle)
  attach    the weights segment read-only (a stray write faults rather than corrupting every
            worker's model), the KV segment read-write
  view      weights unpacked by the manifest and checked against the model's expected shapes;
            the KV pool viewed in the engine's layout (KVCacheSpec.shape)

On cuda the document carries CUDA IPC handles instead of segment names: each is opened in this
process (services.arena.cuda_export.rebuild), giving a flat uint8 tensor over the arena's allocation
(no copy; a write by one process is seen by every other), and is viewed exactly as a segment is.

Then: `LlamaModel(view.model_config, view.weights)` and `ModelRunner(model, view.kv_cache, block_size)`.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.arena.export import MAX_DOCUMENT_BYTES, ArenaExport, peer_credentials
from services.common.shm import Segment, attach_segment
from services.common.weights_pack import unpack
from services.engine.kv_cache import KVCacheSpec, view_kv_pool
from services.engine.llm_engine import DTYPES
from services.engine.loader import expected_shapes
from services.engine.model_config import ModelConfig


@dataclass(eq=False)
class ArenaView:
    """A worker's view of the arena's memory. Every tensor here is a view of a shared segment."""

    model_config: ModelConfig
    weights: dict[str, torch.Tensor]        # engine names -> read-only views of the weights segment
    kv_cache: torch.Tensor                  # kv_spec.shape ([L, 2, N, ...]) over the KV segment
    kv_spec: KVCacheSpec
    model_dir: Path                         # tokenizer and config.json
    arena_pid: int                          # the arena these segments belong to
    memory_id: str = ""                     # ArenaExport.memory_id: which memory this is (on every hand-off)
    _segments: tuple[Segment, ...] = field(default=(), repr=False)

    def close(self) -> None:
        """Release the segment handles. Tensors still referenced (by a model, a runner) stay valid and
        the memory is unmapped when the last of them is freed."""
        for segment in self._segments:
            segment.close()


def fetch_export(socket_path: Path, timeout: float) -> ArenaExport:
    """The arena's document, retrying while its socket is missing or refuses (arena still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ArenaExport.from_json(_read_document(Path(socket_path), max(0.1, deadline - time.monotonic())))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no arena answered on {socket_path} within {timeout:.0f} s "
                                   f"({type(e).__name__}): is `python -m services.arena.main` running?") from e
            time.sleep(0.1)


def _read_document(path: Path, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        pid, uid, _ = peer_credentials(sock)
        if uid != os.getuid():
            raise PermissionError(f"{path} is served by pid {pid} of uid {uid}, not by our uid {os.getuid()}")
        chunks, size = [], 0
        while chunk := sock.recv(1 << 16):
            size += len(chunk)
            if size > MAX_DOCUMENT_BYTES:
                raise ValueError(f"arena document on {path} is larger than {MAX_DOCUMENT_BYTES} bytes")
            chunks.append(chunk)
    if not chunks:
        raise PermissionError(f"the arena on {path} closed the connection unanswered (it serves only its own uid)")
    return b"".join(chunks)


def attach_arena(socket_path: Path | str, timeout: float = 30.0, device: str = "cpu") -> ArenaView:
    """Connect to the arena, map its segments (or open its CUDA IPC handles) and return zero-copy views
    of the weights and KV pool. `device` is where this worker computes; it must be the arena's."""
    export = fetch_export(Path(socket_path), timeout)
    if export.device != device:
        raise ValueError(f"the arena on {socket_path} holds its memory on {export.device}, this worker runs on "
                         f"{device}: start both with the same --device")
    model_config = export.config()
    kv = export.kv_spec
    if kv.dtype not in DTYPES:
        raise ValueError(f"arena KV dtype {kv.dtype!r} is not one of {', '.join(DTYPES)}")
    spec = KVCacheSpec(kv.num_layers, kv.num_blocks, kv.block_size, kv.num_kv_heads, kv.head_dim, DTYPES[kv.dtype])
    if export.cuda is not None:
        return _attach_cuda(export, model_config, spec)
    weights_segment = attach_segment(export.weights_segment, writable=False)
    kv_segment = attach_segment(export.kv_segment, writable=True)
    try:
        weights = unpack(weights_segment.tensor(), export.weights_manifest)
        check_weights(weights, model_config, DTYPES[kv.dtype])
        kv_cache = view_kv_pool(kv_segment.tensor(), spec)
    except BaseException:
        weights_segment.close()
        kv_segment.close()
        raise
    return ArenaView(model_config, weights, kv_cache, spec, Path(export.model_dir), export.arena_pid,
                     export.memory_id, (weights_segment, kv_segment))


def _attach_cuda(export: ArenaExport, model_config: ModelConfig, spec: KVCacheSpec) -> ArenaView:
    from services.arena.cuda_export import rebuild
    weights_buffer = rebuild(export.cuda.weights)        # [bytes] uint8 over the arena's allocation
    kv_buffer = rebuild(export.cuda.kv)
    weights = unpack(weights_buffer, export.weights_manifest)
    check_weights(weights, model_config, spec.dtype)
    return ArenaView(model_config, weights, view_kv_pool(kv_buffer, spec), spec, Path(export.model_dir),
                     export.arena_pid, export.memory_id)


def check_weights(weights: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype) -> None:
    expected = expected_shapes(config)
    wrong = [name for name, shape in expected.items()
             if name not in weights or tuple(weights[name].shape) != shape or weights[name].dtype != dtype]
    if wrong:
        raise ValueError(f"arena weights do not match the model config: {', '.join(wrong[:6])}")
