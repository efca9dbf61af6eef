"""CUDA IPC for the arena: one GPU allocation described as JSON, and rebuilt as a tensor in a worker.

The arena allocates the packed weights and the KV pool as one flat uint8 CUDA tensor each. To hand
them to a worker it takes what torch.multiprocessing would pickle for a CUDA tensor
(`torch.multiprocessing.reductions.reduce_tensor`: the storage's cudaIpcMemHandle, torch's shared
ref-counter slot, the IPC event recorded after the last write) and writes those fields into the
arena's JSON document instead, bytes as base64. The worker passes them back to torch's own
`rebuild_cuda_tensor`, which opens the handle (cudaIpcOpenMemHandle): the tensor it returns points
into the arena's allocation, no copy. semi-PD shares its resident store the same way.

  describe   arena: flat uint8 CUDA tensor -> CudaIpcHandle (call once per worker connection: every
             send takes its own ref-counter slot, as torch.multiprocessing does)
  to_dict / from_dict   the JSON form, validated (it crossed a process boundary)
  rebuild    worker: CudaIpcHandle -> flat uint8 CUDA tensor over the arena's memory

Only `describe` and `rebuild` import torch (lazily), so the JSON form can be used and tested anywhere.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

MAX_HANDLE_BYTES = 4096            # cudaIpcMemHandle_t is 64 bytes; torch's ref-counter name is a short path


@dataclass(frozen=True, slots=True)
class CudaIpcHandle:
    """One CUDA allocation, as a worker needs it to map the same memory."""

    device: int                    # CUDA device index in the arena's process (workers see the same devices)
    handle: bytes                  # cudaIpcMemHandle_t of the cudaMalloc block holding the storage
    storage_size_bytes: int        # bytes of the storage: the flat tensor's length
    storage_offset_bytes: int      # where the storage starts inside that block (torch's caching allocator)
    ref_counter_handle: bytes      # torch's shared ref-counter file: tells the arena when workers let go
    ref_counter_offset: int        # this send's slot in that file
    event_handle: bytes | None     # cudaIpcEventHandle_t recorded after the arena's writes, or None
    event_sync_required: bool      # the worker's stream waits on that event before using the memory

    def __post_init__(self) -> None:
        for name in ("handle", "ref_counter_handle"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or not 0 < len(value) <= MAX_HANDLE_BYTES:
                raise ValueError(f"CUDA IPC {name} must be 1..{MAX_HANDLE_BYTES} bytes")
        if self.event_handle is not None and (not isinstance(self.event_handle, bytes)
                                              or len(self.event_handle) > MAX_HANDLE_BYTES):
            raise ValueError(f"CUDA IPC event_handle must be at most {MAX_HANDLE_BYTES} bytes or null")
        for name in ("device", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"CUDA IPC {name} must be a non-negative integer, got {value!r}")
        if self.storage_size_bytes < 1:
            raise ValueError("CUDA IPC storage_size_bytes must be at least 1")
        if type(self.event_sync_required) is not bool:
            raise ValueError("CUDA IPC event_sync_required must be a boolean")

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "handle": _b64(self.handle), "storage_size_bytes": self.storage_size_bytes,
                "storage_offset_bytes": self.storage_offset_bytes,
                "ref_counter_handle": _b64(self.ref_counter_handle), "ref_counter_offset": self.ref_counter_offset,
                "event_handle": None if self.event_handle is None else _b64(self.event_handle),
                "event_sync_required": self.event_sync_required}

    @classmethod
    def from_dict(cls, data: Any) -> "CudaIpcHandle":
        if not isinstance(data, dict):
            raise ValueError("a CUDA IPC handle must be a JSON object")
        try:
            event = data["event_handle"]
            return cls(device=data["device"], handle=_unb64(data["handle"]),
                       storage_size_bytes=data["storage_size_bytes"],
                       storage_offset_bytes=data["storage_offset_bytes"],
                       ref_counter_handle=_unb64(data["ref_counter_handle"]),
                       ref_counter_offset=data["ref_counter_offset"],
                       event_handle=None if event is None else _unb64(event),
                       event_sync_required=data["event_sync_required"])
        except KeyError as e:
            raise ValueError(f"CUDA IPC handle lacks field {e.args[0]!r}") from None


@dataclass(frozen=True, slots=True)
class CudaExport:
    """The `cuda` section of the arena's document: its two allocations."""

    weights: CudaIpcHandle         # every weight packed (services.common.weights_pack), manifest beside it
    kv: CudaIpcHandle              # the KV pool, laid out as KVCacheSpec.shape

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.to_dict(), "kv": self.kv.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> "CudaExport":
        if not isinstance(data, dict) or set(data) != {"weights", "kv"}:
            raise ValueError("the arena's cuda section must hold exactly 'weights' and 'kv'")
        return cls(CudaIpcHandle.from_dict(data["weights"]), CudaIpcHandle.from_dict(data["kv"]))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str) or len(text) > 2 * MAX_HANDLE_BYTES:
        raise ValueError("a CUDA IPC handle field must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"a CUDA IPC handle field is not valid base64: {e}") from None


# ---------------------------------------------------------------------------------------------- torch

def describe(tensor: Any) -> CudaIpcHandle:
    """Arena side: the IPC description of a flat uint8 CUDA tensor that owns its whole storage."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    if tensor.device.type != "cuda" or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"only flat uint8 CUDA tensors are exported, got {tensor.dtype} {tuple(tensor.shape)} "
                         f"on {tensor.device}")
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.numel():
        raise ValueError("an exported tensor must span its whole storage (one allocation, no view)")
    _rebuild, args = reduce_tensor(tensor)
    # rebuild_cuda_tensor's arguments, by position (torch/multiprocessing/reductions.py):
    (_cls, _size, _stride, _offset, _storage_cls, _dtype, device, handle, storage_size_bytes, storage_offset_bytes,
     _requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required) = args
    return CudaIpcHandle(int(device), bytes(handle), int(storage_size_bytes), int(storage_offset_bytes),
                         bytes(ref_counter_handle), int(ref_counter_offset),
                         None if event_handle is None else bytes(event_handle), bool(event_sync_required))


def rebuild(desc: CudaIpcHandle) -> Any:
    """Worker side: a flat uint8 CUDA tensor [storage_size_bytes] over the arena's allocation (no copy)."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not torch.cuda.is_available():
        raise RuntimeError("the arena exports CUDA memory but this process sees no GPU: start the worker with "
                           "the arena's CUDA_VISIBLE_DEVICES")
    if desc.device >= torch.cuda.device_count():
        raise RuntimeError(f"the arena's memory is on cuda:{desc.device}, this process sees "
                           f"{torch.cuda.device_count()} device(s)")
    numel = desc.storage_size_bytes
    return rebuild_cuda_tensor(torch.Tensor, torch.Size([numel]), (1,), 0, torch.storage.TypedStorage,
                               torch.uint8, desc.device, desc.handle, desc.storage_size_bytes,
                               desc.storage_offset_bytes, False, desc.ref_counter_handle, desc.ref_counter_offset,
                               desc.event_handle, desc.event_sync_required)


# ---------------------------------------------------------------------------------------------- cuda-python

@dataclass(frozen=True, slots=True)
class _DeviceBytes:
    """A device range as `__cuda_array_interface__` (version 3), so torch.as_tensor wraps it without a copy."""

    address: int
    num_bytes: int

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.num_bytes,), "typestr": "|u1", "data": (self.address, False), "version": 3,
                "strides": None, "stream": None}


def rebuild_with_driver(desc: CudaIpcHandle) -> Any:
    """Worker side, through cuda-python's driver bindings instead of torch's private rebuild: the block
    is opened with cuIpcOpenMemHandle (no ref-counter file: the arena keeps its allocations for its
    life), and when the arena recorded an event after its writes, this thread's stream waits for it on
    the device (cuIpcOpenEventHandle + cuStreamWaitEvent). The same flat uint8 tensor as `rebuild`;
    the mapping lives as long as the process (CUDA unmaps it at exit)."""
    import torch

    from services.common import cuda_driver

    if not torch.cuda.is_available():
        raise RuntimeError("the arena exports CUDA memory but this process sees no GPU: start the worker with "
                           "the arena's CUDA_VISIBLE_DEVICES")
    torch.cuda.init()
    with torch.cuda.device(desc.device):
        torch.zeros(1, device=f"cuda:{desc.device}")          # torch's primary context current on this thread
        base = cuda_driver.open_ipc_mem(desc.handle)
        if desc.event_handle is not None and desc.event_sync_required:
            event = cuda_driver.IpcEvent.open(desc.event_handle, desc.device)
            event.wait(torch.cuda.current_stream(desc.device).cuda_stream)
        view = _DeviceBytes(base + desc.storage_offset_bytes, desc.storage_size_bytes)
        return torch.as_tensor(view, device=f"cuda:{desc.device}")
