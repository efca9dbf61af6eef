"""Many tensors in one flat byte buffer, described by a JSON manifest: no pickle, zero-copy unpacking.

The arena packs the engine's weights into one shared-memory segment; every worker unpacks views of
that segment with the manifest it received over the arena's socket.

  layout     tensors -> manifest {name: {offset, shape, dtype, nbytes}} + total bytes; offsets are
             64-byte aligned (a cache line, and enough for any dtype's view)
  pack_into  copies each tensor to its offset in a uint8 buffer the caller owns (a segment)
  unpack     buffer + manifest -> {name: view}; every entry is validated against the buffer first,
             since the manifest crossed a process boundary
"""
from __future__ import annotations

import math
from typing import Any

import torch

ALIGNMENT = 64
Manifest = dict[str, dict[str, Any]]        # name -> {"offset": int, "shape": [int], "dtype": str, "nbytes": int}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def layout(tensors: dict[str, torch.Tensor]) -> tuple[Manifest, int]:
    """Where each tensor goes, in dict order; and the buffer size that holds them all."""
    manifest: Manifest = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be packed (supported: {', '.join(DTYPES)})")
        nbytes = t.numel() * t.element_size()
        manifest[name] = {"offset": offset, "shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype], "nbytes": nbytes}
        offset = _align(offset + nbytes)
    return manifest, offset


def packed_nbytes(manifest: Manifest) -> int:
    """Bytes a buffer needs for `manifest` (at least 1, so it can be a shared-memory segment)."""
    return max([1] + [e["offset"] + e["nbytes"] for e in manifest.values()])


def pack_into(buffer: torch.Tensor, tensors: dict[str, torch.Tensor], manifest: Manifest) -> None:
    """Copy every tensor into `buffer` (flat uint8) at its manifest offset; any layout or device in."""
    views = unpack(buffer, manifest)
    for name, t in tensors.items():
        views[name].copy_(t)


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Manifest]:
    """A new private buffer holding every tensor, and its manifest."""
    manifest, size = layout(tensors)
    buffer = torch.empty(max(size, 1), dtype=torch.uint8)
    pack_into(buffer, tensors, manifest)
    return buffer, manifest


def unpack(buffer: torch.Tensor, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Views into `buffer` (flat contiguous uint8), one per manifest entry: no copy."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"buffer must be a flat contiguous uint8 tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    size = buffer.numel()
    views: dict[str, torch.Tensor] = {}
    for name, entry in manifest.items():
        offset, shape, dtype, nbytes = _check_entry(name, entry, size)
        views[name] = buffer[offset: offset + nbytes].view(dtype).view(shape)
    return views


def _check_entry(name: str, entry: Any, size: int) -> tuple[int, tuple[int, ...], torch.dtype, int]:
    if not isinstance(entry, dict):
        raise ValueError(f"manifest entry {name!r} is not an object")
    offset, shape, dtype_name, nbytes = entry.get("offset"), entry.get("shape"), entry.get("dtype"), entry.get("nbytes")
    if dtype_name not in DTYPES:
        raise ValueError(f"manifest entry {name!r}: unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"manifest entry {name!r}: shape must be a list of non-negative ints, got {shape!r}")
    if type(offset) is not int or offset < 0 or offset % ALIGNMENT:
        raise ValueError(f"manifest entry {name!r}: offset must be a non-negative multiple of {ALIGNMENT}, got {offset!r}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes != expected:
        raise ValueError(f"manifest entry {name!r}: nbytes {nbytes!r} != {expected} for shape {shape} {dtype_name}")
    if offset + nbytes > size:
        raise ValueError(f"manifest entry {name!r} ends at byte {offset + nbytes}, past the buffer's {size}")
    return offset, tuple(shape), dtype, nbytes
