"""How one process's KV writes are ordered before another process's reads of the shared pool.

Prefill and decode are two processes with their own CUDA streams over one KV allocation (CUDA IPC).
CUDA orders work only within a stream; nothing orders one process's kernels against another's by
itself. Two ways, one interface (`KvWriteOrder`):

  device   (cuda, with cuda-python: prefill) prefill records an interprocess event on its stream
           after each iteration (`writes_done`) and every hand-off it publishes names that event
           (Handoff.kv_ready_event, its 64-byte IPC handle in hex). Decode opens each handle once and
           makes its stream wait for the event before it queues any read of the blocks
           (`before_reads`, cuStreamWaitEvent): the order is kept on the device, prefill's host
           thread never blocks on it. A wait issued after prefill recorded the event again waits for
           that later work too: later, never earlier, so never wrong.
  host     (cpu, cuda without cuda-python, decode's own writes, a retiring worker) `writes_done`
           waits for this thread's stream; the reader needs nothing (`before_reads("")`).

Decode's writes that prefill reads later (cached prefix blocks, published with the iteration's
keys) are host-fenced: decode's sampler copies its tokens to the host every iteration anyway, so the
fence costs nothing there. Prefill's sampler does too today, so the event is what states the order
of hand-offs rather than that side effect. Blocks prefill frees (a cancelled or preempted request's)
may be granted to decode, whose writes then must not race prefill's late ones: that order is the
host's, since prefill's sampler has waited for its stream before the iteration's frees are
published; a prefill whose sampling went asynchronous would have to wait for its event before
publishing frees as well.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch

from services.common import cuda_driver

log = logging.getLogger(__name__)


class DeviceEvent(Protocol):
    """An interprocess CUDA event (cuda_driver.IpcEvent)."""

    handle: bytes

    def record(self, stream: int) -> None: ...
    def wait(self, stream: int) -> None: ...


def kv_fence(kv_cache: torch.Tensor | None) -> None:
    """Block until the work queued on the pool's device by this thread's stream is done; no-op on CPU."""
    if kv_cache is not None and kv_cache.device.type == "cuda":
        torch.cuda.current_stream(kv_cache.device).synchronize()


def _current_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream       # the CUstream address torch queues on


class KvWriteOrder:
    """Orders this worker's KV writes before other processes' reads: by a device event that hand-offs
    name, or by the host fence. `create_event`/`open_event`/`stream_of` default to cuda_driver and
    torch; the tests pass a fake device (there is no GPU on CI) and say so."""

    def __init__(self, kv_cache: torch.Tensor | None, *, by_event: bool,
                 create_event: Callable[[int], DeviceEvent] = cuda_driver.IpcEvent.create,
                 open_event: Callable[[bytes, int], DeviceEvent] = cuda_driver.IpcEvent.open,
                 stream_of: Callable[[torch.device], int] = _current_stream, on_cuda: bool | None = None) -> None:
        self.kv_cache = kv_cache                         # None: a worker built without a model (tests)
        self.device = kv_cache.device if kv_cache is not None else torch.device("cpu")
        self.on_cuda = self.device.type == "cuda" if on_cuda is None else on_cuda   # the fake device's tests set it
        self.ordinal = self.device.index or 0
        self._open_event, self._stream_of = open_event, stream_of
        self._opened: dict[str, DeviceEvent | None] = {}     # by handle hex: each opened once (None: could not)
        self._event: DeviceEvent | None = None
        if by_event:
            self._event = create_event(self.ordinal)

    @classmethod
    def for_worker(cls, kv_cache: torch.Tensor | None, publishes_handoffs: bool) -> "KvWriteOrder":
        """By event where this worker hands KV to another process on CUDA and cuda-python is there;
        else by the host fence (logged once: the order still holds, at the cost of a host wait)."""
        if not publishes_handoffs or kv_cache is None or kv_cache.device.type != "cuda":
            return cls(kv_cache, by_event=False)
        try:
            return cls(kv_cache, by_event=True)
        except cuda_driver.CudaDriverError as e:
            log.warning("KV hand-offs fenced on the host, not by an IPC event: %s", e)
            return cls(kv_cache, by_event=False)

    @property
    def handle(self) -> str:
        """What a hand-off carries (Handoff.kv_ready_event): the event's IPC handle in hex; "" host-fenced."""
        return self._event.handle.hex() if self._event is not None else ""

    def writes_done(self) -> None:
        """After an iteration's KV writes are queued, before any hand-off naming them is published."""
        if self._event is not None:
            self._event.record(self._stream_of(self.device))
        else:
            kv_fence(self.kv_cache)

    def before_reads(self, handle: str) -> None:
        """Before this worker queues reads of blocks a hand-off names: its stream waits for the writer's
        event. "" (host-fenced writer), or a pool not on CUDA: nothing to wait for."""
        if not handle or not self.on_cuda:
            return
        if handle not in self._opened:
            self._opened[handle] = self._open(handle)
        event = self._opened[handle]
        if event is not None:
            event.wait(self._stream_of(self.device))

    def _open(self, handle: str) -> DeviceEvent | None:
        """The writer's event; None if it cannot be opened (cuda-python missing here, or the writer
        died and took it along): then the writer's host thread had already waited for its sampled
        tokens, which come after the KV writes on its stream, before it published the hand-off."""
        try:
            return self._open_event(cuda_driver.check_handle(bytes.fromhex(handle), "kv_ready_event"),
                                    self.ordinal)
        except (cuda_driver.CudaDriverError, ValueError) as e:
            log.warning("cannot open a hand-off's kv_ready_event (%s); relying on the writer's host sync", e)
            return None
