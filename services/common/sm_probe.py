"""The SM probe from Python: how many SMs a launch from this process actually runs on.

The probe is the CUDA C library `native/build/libduoserve_native.so` (source `native/sm_probe.cu`,
built by `make native`), called through ctypes. It runs in the caller's process and CUDA context,
so under MPS it sees the caller's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE limit.

Nothing happens at import: the library is loaded at the first call (once per path), and every
failure (no library, no driver, no device, a CUDA error) comes back as a result carrying the
reason, never as an exception, so a worker without a GPU or without nvcc still starts.
"""
from __future__ import annotations

import ctypes
import enum
import functools
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "native" / "build" / "libduoserve_native.so"
ABI_VERSION = 1             # DUO_SM_PROBE_VERSION in native/sm_probe.h that this module speaks
_ERR_LEN = 512


class ProbeCode(enum.IntEnum):
    """Why a probe gave no count: the library's DUO_SM_PROBE_* codes, plus NO_LIBRARY from here."""

    NO_LIBRARY = -1         # the .so is missing, unloadable, or of another ABI version (run `make native`)
    OK = 0
    NO_DRIVER = 1           # libcuda.so.1 not found: no NVIDIA driver on this machine
    OLD_DRIVER = 2          # the driver is older than the CUDA runtime linked into the library
    NO_DEVICE = 3           # a driver, but no usable CUDA device
    BAD_ARGUMENT = 4        # device index out of range, or a count out of bounds
    CUDA_ERROR = 5          # any other CUDA runtime error


@dataclass(frozen=True, slots=True)
class SmProbeResult:
    """One probe: the SMs a launch ran on, or why that is unknown."""

    num_sms_used: int               # distinct SMs the probe kernel's blocks ran on; 0 on error
    num_sms_total: int              # the SM count this process's context sees (under MPS: the limited count); 0 on error
    error: str | None = None        # None on success; otherwise the cause, for a person to act on
    code: ProbeCode = ProbeCode.OK  # the cause as a code, for callers that branch on it

    @property
    def ok(self) -> bool:
        return self.code is ProbeCode.OK


class NativeLibraryError(OSError):
    """The native library cannot be used: missing, not loadable, or built for another ABI version."""


@functools.lru_cache(maxsize=4)
def load_library(path: Path = DEFAULT_LIBRARY) -> ctypes.CDLL:
    """The native library at `path` with its functions typed; raises NativeLibraryError."""
    if not path.is_file():
        raise NativeLibraryError(f"native library {path} not found: build it with `make native` (needs nvcc)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeLibraryError(f"cannot load native library {path}: {e}") from None
    lib.duo_sm_probe_version.restype = ctypes.c_int
    lib.duo_sm_probe_version.argtypes = []
    version = lib.duo_sm_probe_version()
    if version != ABI_VERSION:
        raise NativeLibraryError(f"native library {path} has ABI version {version}, this code speaks "
                                 f"{ABI_VERSION}: rebuild it with `make native`")
    for name in ("duo_sm_probe_cuda_runtime_version", "duo_sm_probe_driver_version"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
    lib.duo_sm_probe.restype = ctypes.c_int
    lib.duo_sm_probe.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                 ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
    return lib


def probe_sms(device: int = 0, *, num_blocks: int = 0, spin_us: int = -1,
              library: Path = DEFAULT_LIBRARY) -> SmProbeResult:
    """Run the probe on CUDA device `device` in this process.

    num_blocks <= 0 and spin_us < 0 take the library's defaults (4 blocks per SM, 200 us each).
    Takes about a millisecond on a GPU; the first call also initializes the CUDA runtime.
    """
    try:
        lib = load_library(library)
    except NativeLibraryError as e:
        return SmProbeResult(0, 0, str(e), ProbeCode.NO_LIBRARY)
    used, total = ctypes.c_int(0), ctypes.c_int(0)
    err = ctypes.create_string_buffer(_ERR_LEN)
    code = lib.duo_sm_probe(device, num_blocks, spin_us, ctypes.byref(used), ctypes.byref(total), err, _ERR_LEN)
    if code == ProbeCode.OK:
        return SmProbeResult(used.value, total.value)
    try:
        cause = ProbeCode(code)
    except ValueError:
        cause = ProbeCode.CUDA_ERROR       # a code from a newer library: still an error
    return SmProbeResult(0, 0, err.value.decode(errors="replace") or f"probe failed with code {code}", cause)
