"""Retune by green context (`--retune-mode green`, cuda): a share is the set of SMs the worker's
stream runs on, changed at an iteration boundary in the same process, in milliseconds.

The other cuda path, succession, starts a new process at a new MPS percentage (seconds: a model
view, a warm-up). Here the worker pre-creates green-context partitions at a few shares of the GPU
when it starts (services/common/cuda_driver.GreenShares: cuDevSmResourceSplitByCount ->
cuGreenCtxCreate -> cuGreenCtxStreamCreate) and a new share makes the smallest partition that
holds its SMs the thread's current torch stream: every kernel after that (forward, sampler, the
KV fence's event) is queued there. The previous stream is drained first, so nothing of the old
share runs on after the switch and no work is reordered. Caps, not isolation: partitions split from
the whole device overlap as MPS caps do, and the process's MPS percentage must be 100 (the cap
would clip the partition otherwise: WorkerConfig refuses anything else).

A lifecycle: `GreenRetune.create` at start-up (CudaDriverError with what is missing, before the
worker serves), `apply(share)` per SetComputeShare, `close()` at exit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from services.common import cuda_driver
from services.common.shares import UnitSpace

DEFAULT_GREEN_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)   # partitions made at start-up


def parse_green_shares(text: str) -> tuple[float, ...]:
    """`--green-shares 0.25,0.5,1`: the shares partitions are made at; ValueError naming a bad one."""
    try:
        shares = tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"--green-shares takes comma-separated fractions such as 0.25,0.5,1, got {text!r}") from None
    if not shares or any(not 0.0 < s <= 1.0 for s in shares):
        raise ValueError(f"--green-shares must be fractions in (0, 1], got {text!r}")
    return shares


@dataclass(frozen=True, slots=True)
class GreenSwitch:
    """What one `apply` did."""

    sm_count: int            # SMs of the partition now in use (the driver's rounding included)
    switch_ms: float         # drain of the old stream plus the switch: the worker's pause


class GreenRetune:
    """The worker's green partitions and which one its thread runs on. `torch_ops` is (make a torch
    stream from a CUstream address, make it current, drain the current one); the default is torch's
    CUDA API, the tests give a fake (no GPU on CI) and say so."""

    def __init__(self, green: Any, space: UnitSpace, torch_ops: tuple[Callable, Callable, Callable]) -> None:
        self.green = green                    # cuda_driver.GreenShares (or the tests' fake of it)
        self.space = space
        self._external, self._set_current, self._drain = torch_ops
        self.current_sms = 0                  # 0: still on the stream it started on (the whole process's cap)

    @classmethod
    def create(cls, shares: Sequence[float], ordinal: int = 0) -> "GreenRetune":
        """Partitions at `shares` of GPU `ordinal` (its SM count from the driver)."""
        space = UnitSpace.cuda(cuda_driver.sm_count(ordinal))
        return cls(cuda_driver.GreenShares.create(space, shares, ordinal), space, _torch_ops(ordinal))

    def apply(self, share: float) -> GreenSwitch:
        """Run from now on in the smallest partition holding `share`'s SMs (else the largest)."""
        started = time.perf_counter()
        partition = self.green.for_units(self.space.units_for(share))
        if partition.sm_count != self.current_sms:
            self._drain()                                   # the old share's work ends on the old SMs
            self._set_current(self._external(partition.stream_handle))
            self.current_sms = partition.sm_count
        return GreenSwitch(partition.sm_count, (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        self._drain()
        self.green.close()


def _torch_ops(ordinal: int) -> tuple[Callable, Callable, Callable]:
    import torch
    device = torch.device("cuda", ordinal)
    return (lambda handle: torch.cuda.ExternalStream(handle, device=device),
            torch.cuda.set_stream,
            lambda: torch.cuda.current_stream(device).synchronize())
