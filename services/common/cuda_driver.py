"""The CUDA driver through cuda-python's documented bindings (`cuda.bindings.driver`): device
attributes, IPC memory and event handles, green-context SM partitions.

What it is for, beside torch and the hand-built SM probe (`services/common/sm_probe.py`):
  device      `cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)` and friends: the SM count without a
              kernel launch and without `make native` (the probe measures what a launch really gets)
  IPC memory  `cuIpcGetMemHandle` / `cuIpcOpenMemHandle`: the same 64-byte handle torch's
              `reduce_tensor` carries, opened without torch's ref-counter file (the arena keeps its
              allocations for its life anyway: services/arena/cuda_export.py)
  IPC events  `cuEventCreate(INTERPROCESS | DISABLE_TIMING)`, `cuIpcGetEventHandle` /
              `cuIpcOpenEventHandle`, `cuStreamWaitEvent`: one process's stream waits for another's
              work on the device, not on the host (prefill's KV writes before decode's reads)
  green       `cuDeviceGetDevResource` -> `cuDevSmResourceSplitByCount` -> `cuDevResourceGenerateDesc`
              -> `cuGreenCtxCreate` -> `cuGreenCtxStreamCreate`: streams confined to a set of SMs,
              pre-created at a few sizes and picked per iteration (the design's fast retune path;
              under MPS the client's percentage must be 100)

Every binding returns a tuple whose first item is a CUresult; `_call` turns a failure into a
CudaDriverError naming the call and CUDA's error name. Nothing happens at import: cuda-python is
imported at the first call, so this module imports on a machine without it, without a driver and
without a GPU, and each of those is a CudaDriverError naming the missing piece. Arguments are checked
before any driver call, so that part is tested on the CPU.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Sequence

from services.common.shares import UnitSpace, green_partition_units, pick_partition

IPC_HANDLE_BYTES = 64        # CU_IPC_HANDLE_SIZE: cuIpcMemHandle and cuIpcEventHandle are 64 opaque bytes
INSTALL_HINT = "pip install cuda-python (the `gpu` extra: pip install 'duoserve[gpu]')"


class CudaDriverError(RuntimeError):
    """cuda-python, the NVIDIA driver or a GPU is missing, or a driver call failed (named, with CUDA's error)."""


@functools.lru_cache(maxsize=1)
def driver() -> Any:
    """`cuda.bindings.driver`, initialized (cuInit) once per process; CudaDriverError naming what is missing."""
    try:
        from cuda.bindings import driver as cu
    except ImportError as e:
        raise CudaDriverError(f"cuda-python is not installed ({e}): {INSTALL_HINT}") from None
    try:
        (err,) = cu.cuInit(0)
    except RuntimeError as e:          # cuda.pathfinder: libcuda.so.1 not found
        raise CudaDriverError(f"no NVIDIA driver: libcuda.so.1 cannot be loaded ({e})") from None
    if err != cu.CUresult.CUDA_SUCCESS:
        raise CudaDriverError(f"cuInit failed: {_error_name(cu, err)} (no usable NVIDIA GPU?)")
    return cu


def _error_name(cu: Any, err: Any) -> str:
    try:
        code, name = cu.cuGetErrorName(err)
        return name.decode() if code == cu.CUresult.CUDA_SUCCESS else str(err)
    except Exception:                  # noqa: BLE001 - naming an error must not raise another
        return str(err)


def _call(name: str, *args: Any) -> Any:
    """`cuda.bindings.driver.<name>(*args)`: its value (None, one value, or a tuple), or CudaDriverError."""
    cu = driver()
    err, *values = getattr(cu, name)(*args)
    if err != cu.CUresult.CUDA_SUCCESS:
        raise CudaDriverError(f"{name} failed: {_error_name(cu, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _check_ordinal(ordinal: int) -> int:
    if type(ordinal) is not int or ordinal < 0:
        raise ValueError(f"a CUDA device ordinal is a non-negative integer, got {ordinal!r}")
    return ordinal


# ---------------------------------------------------------------------------------------------- device

@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the driver says about one device (in this process's context: under MPS, as its client)."""

    ordinal: int                       # CUDA device index in this process
    name: str                          # e.g. "NVIDIA H100 80GB HBM3"
    sm_count: int                      # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    compute_capability: tuple[int, int]
    total_memory_bytes: int


def device_info(ordinal: int = 0) -> DeviceInfo:
    _check_ordinal(ordinal)
    cu = driver()
    dev = _call("cuDeviceGet", ordinal)
    attr = cu.CUdevice_attribute
    sms = _call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
    major = _call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    minor = _call("cuDeviceGetAttribute", attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    name = _call("cuDeviceGetName", 256, dev)
    memory = _call("cuDeviceTotalMem", dev)
    text = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return DeviceInfo(ordinal, text, int(sms), (int(major), int(minor)), int(memory))


def sm_count(ordinal: int = 0) -> int:
    """The device's SM count as the driver reports it to this process."""
    return device_info(ordinal).sm_count


def ensure_context(ordinal: int = 0) -> Any:
    """The current context, else the device's primary context (torch's) made current on this thread:
    events and streams are created in the current context."""
    current = _call("cuCtxGetCurrent")
    if current is not None and int(current) != 0:
        return current
    dev = _call("cuDeviceGet", _check_ordinal(ordinal))
    ctx = _call("cuDevicePrimaryCtxRetain", dev)
    _call("cuCtxSetCurrent", ctx)
    return ctx


# ---------------------------------------------------------------------------------------------- IPC

def check_handle(raw: bytes, what: str = "IPC handle") -> bytes:
    """A CUDA IPC handle as it crossed a process boundary: exactly 64 bytes."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != IPC_HANDLE_BYTES:
        size = len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__
        raise ValueError(f"a CUDA {what} is {IPC_HANDLE_BYTES} bytes, got {size}")
    return bytes(raw)


def _handle_bytes(handle: Any) -> bytes:
    return ctypes.string_at(int(handle.getPtr()), IPC_HANDLE_BYTES)


def _handle_of(type_name: str, raw: bytes) -> Any:
    handle = getattr(driver(), type_name)()
    ctypes.memmove(int(handle.getPtr()), raw, IPC_HANDLE_BYTES)
    return handle


def ipc_mem_handle(device_ptr: int) -> bytes:
    """The IPC handle of the allocation starting at `device_ptr` (the base of a cuMemAlloc/cudaMalloc block)."""
    if type(device_ptr) is not int or device_ptr <= 0:
        raise ValueError(f"device_ptr must be a positive device address, got {device_ptr!r}")
    return _handle_bytes(_call("cuIpcGetMemHandle", device_ptr))


def open_ipc_mem(raw: bytes) -> int:
    """Map another process's allocation here; its base address in this process (cuIpcOpenMemHandle)."""
    raw = check_handle(raw, "IPC memory handle")
    cu = driver()
    ptr = _call("cuIpcOpenMemHandle", _handle_of("CUipcMemHandle", raw),
                cu.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
    return int(ptr)


def close_ipc_mem(device_ptr: int) -> None:
    _call("cuIpcCloseMemHandle", device_ptr)


@dataclass
class IpcEvent:
    """An interprocess event: recorded on one process's stream, waited on by another's, on the device."""

    event: Any                         # CUevent
    handle: bytes                      # its 64-byte IPC handle, for the other process

    @classmethod
    def create(cls, ordinal: int = 0) -> "IpcEvent":
        """A new event in this process (its IPC handle to hand out); timing off, as IPC requires."""
        cu = driver()
        ensure_context(ordinal)
        flags = int(cu.CUevent_flags.CU_EVENT_INTERPROCESS) | int(cu.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        event = _call("cuEventCreate", flags)
        return cls(event, _handle_bytes(_call("cuIpcGetEventHandle", event)))

    @classmethod
    def open(cls, raw: bytes, ordinal: int = 0) -> "IpcEvent":
        """Another process's event, opened here (cuIpcOpenEventHandle)."""
        raw = check_handle(raw, "IPC event handle")
        ensure_context(ordinal)
        return cls(_call("cuIpcOpenEventHandle", _handle_of("CUipcEventHandle", raw)), raw)

    def record(self, stream: int) -> None:
        """Capture the work queued on `stream` (a CUstream address, e.g. torch's `cuda_stream`) so far."""
        _call("cuEventRecord", self.event, _stream(stream))

    def wait(self, stream: int) -> None:
        """Work queued on `stream` after this waits, on the device, for the work the last record captured."""
        _call("cuStreamWaitEvent", _stream(stream), self.event, 0)

    def done(self) -> bool:
        """Whether the captured work has finished (cuEventQuery; does not block)."""
        cu = driver()
        (err,) = cu.cuEventQuery(self.event)
        if err == cu.CUresult.CUDA_ERROR_NOT_READY:
            return False
        if err != cu.CUresult.CUDA_SUCCESS:
            raise CudaDriverError(f"cuEventQuery failed: {_error_name(cu, err)}")
        return True


def _stream(stream: int) -> Any:
    if type(stream) is not int or stream < 0:
        raise ValueError(f"a stream is its CUstream address (an int >= 0; 0: the legacy default), got {stream!r}")
    return driver().CUstream(stream)


# ---------------------------------------------------------------------------------------------- green contexts

@dataclass(frozen=True, slots=True)
class SmResource:
    """The device's SM resource as the driver describes it: how it may be split."""

    sm_count: int                      # SMs available to this process
    min_partition: int                 # the smallest partition (sm.minSmPartitionSize; 0: unknown)
    alignment: int                     # partitions come in multiples of this (sm.smCoscheduledAlignment)


@dataclass
class GreenPartition:
    """One green context confined to `sm_count` SMs, and a stream in it."""

    requested: int                     # SMs asked for
    sm_count: int                      # SMs the driver gave (rounded up to its minimum and alignment)
    context: Any                       # CUgreenCtx
    stream: Any                        # CUstream in that context (CU_STREAM_NON_BLOCKING)

    @property
    def stream_handle(self) -> int:
        """The stream's address: torch.cuda.ExternalStream(stream_handle) runs torch work on these SMs."""
        return int(self.stream)


def _sm_resource(ordinal: int) -> tuple[Any, Any]:
    _check_ordinal(ordinal)
    cu = driver()
    dev = _call("cuDeviceGet", ordinal)
    return dev, _call("cuDeviceGetDevResource", dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)


def sm_resource(ordinal: int = 0) -> SmResource:
    _, resource = _sm_resource(ordinal)
    sm = resource.sm
    return SmResource(int(sm.smCount), int(getattr(sm, "minSmPartitionSize", 0) or 0),
                      int(getattr(sm, "smCoscheduledAlignment", 0) or 0))


def check_partition_counts(counts: Sequence[int]) -> tuple[int, ...]:
    counts = tuple(counts)
    if not counts or any(type(c) is not int or c < 1 for c in counts):
        raise ValueError(f"green partitions need positive SM counts, got {list(counts)!r}")
    return counts


def create_green_partitions(counts: Sequence[int], ordinal: int = 0) -> list[GreenPartition]:
    """One green context and stream per SM count (each split from the whole device: they may overlap,
    like MPS caps). Destroy them with `destroy_green_partitions`."""
    counts = check_partition_counts(counts)
    cu = driver()
    made: list[GreenPartition] = []
    try:
        for count in counts:
            dev, resource = _sm_resource(ordinal)
            groups, _num, _remainder = _call("cuDevSmResourceSplitByCount", 1, resource, 0, count)
            desc = _call("cuDevResourceGenerateDesc", [groups[0]], 1)
            ctx = _call("cuGreenCtxCreate", desc, dev, int(cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            made.append(GreenPartition(count, int(groups[0].sm.smCount), ctx, None))
            made[-1].stream = _call("cuGreenCtxStreamCreate", ctx, int(cu.CUstream_flags.CU_STREAM_NON_BLOCKING), 0)
    except CudaDriverError:
        destroy_green_partitions(made)
        raise
    return made


def destroy_green_partitions(partitions: Sequence[GreenPartition]) -> None:
    for p in partitions:
        if p.stream is not None:
            _call("cuStreamDestroy", p.stream)
        _call("cuGreenCtxDestroy", p.context)


class GreenShares:
    """Green partitions pre-created at a few shares of a GPU, and the one a phase's units run on: the
    fast retune path behind the shares interface (a new share picks another stream at an iteration
    boundary, no new process). Caps, not isolation: partitions split from the whole device overlap."""

    def __init__(self, partitions: Sequence[GreenPartition]) -> None:
        self.partitions = list(partitions)

    @classmethod
    def create(cls, space: UnitSpace, shares: Sequence[float], ordinal: int = 0) -> "GreenShares":
        """Partitions for `shares` of `space` (services.common.shares), rounded as the driver requires."""
        if space.backend != "cuda":
            raise ValueError(f"green contexts partition a GPU's SMs, not {space.backend} {space.unit}s")
        if not shares or any(not 0.0 < s <= 1.0 for s in shares):
            raise ValueError(f"green shares must be in (0, 1], got {list(shares)!r}")
        resource = sm_resource(ordinal)
        counts = sorted({green_partition_units(space.units_for(s), resource.min_partition, resource.alignment,
                                               resource.sm_count) for s in shares})
        return cls(create_green_partitions(counts, ordinal))

    def for_units(self, units: int) -> GreenPartition:
        """The smallest partition that holds `units` SMs (else the largest)."""
        return self.partitions[pick_partition([p.sm_count for p in self.partitions], units)]

    def close(self) -> None:
        destroy_green_partitions(self.partitions)
        self.partitions = []
