"""Compute shares and the units they buy: the one place share <-> units <-> MPS percentage is converted.

A share is a fraction of the device in (0, 1]. It buys whole units:
  cpu    cores of the stack, one at a time; prefill takes them from the front of the stack's core
         list, decode from the back, so the two sets meet (or overlap) in between
  cuda   SMs, in TPC steps of 2 (NVIDIA hands SMs to a context by TPC); a phase's cap is its
         CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, an integer 1..100 (NVIDIA's MPS documentation)

Rounding, everywhere the same: a share buys its units rounded down to a whole step, at least one
step and at most the device (what the performance model predicts is what a worker gets). An MPS
percentage for some units is the smallest integer percentage whose cap covers them, assuming the
cap is rounded down to whole TPCs too (what `bench/corun.py` measures on a GPU; the SM probe tells
each worker what it really got).

Pure: no torch, grpc or redis (the orchestrator, the workers, the simulator and the benchmarks use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

BACKENDS = ("cpu", "cuda")
TPC_SMS = 2                  # SMs per TPC on NVIDIA GPUs since Volta: the step a share moves in
_EPS = 1e-9                  # shares arrive as floats (units / total): 66/132 * 132 may be 65.99999...


@dataclass(frozen=True, slots=True)
class UnitSpace:
    """The units a share is cut from: cores of the stack (cpu) or SMs of the GPU (cuda)."""

    backend: str             # "cpu" | "cuda"
    num_units: int           # cores of the stack / SMs of the device
    step: int = 1            # units move in steps of this: 1 core, or one TPC (2 SMs)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.step < 1 or self.num_units < self.step or self.num_units % self.step:
            raise ValueError(f"num_units must be a positive multiple of {self.step}, got {self.num_units}")

    @classmethod
    def cpu(cls, num_cores: int) -> "UnitSpace":
        return cls("cpu", num_cores, 1)

    @classmethod
    def cuda(cls, num_sms: int) -> "UnitSpace":
        """A GPU of `num_sms` SMs; an odd count (a part with a TPC fused off) is rounded down to a TPC."""
        return cls("cuda", max(TPC_SMS, num_sms // TPC_SMS * TPC_SMS), TPC_SMS)

    @property
    def unit(self) -> str:
        """What one unit is called in reports and `duoctl status`: "core" or "sm"."""
        return "sm" if self.backend == "cuda" else "core"

    def units_for(self, share: float) -> int:
        """Whole units a share buys: rounded down to the step, at least one step, at most all."""
        units = int(share * self.num_units / self.step + _EPS) * self.step
        return min(self.num_units, max(self.step, units))

    def share_of(self, units: int) -> float:
        """The share that `units` units are."""
        return units / self.num_units

    def check_units(self, units: int) -> int:
        """`units` as a worker may be given them: a whole number of steps within the device; else ValueError."""
        if type(units) is not int or not self.step <= units <= self.num_units or units % self.step:
            raise ValueError(f"units must be a multiple of {self.step} in {self.step}..{self.num_units} "
                             f"({self.unit}s), got {units!r}")
        return units

    # ------------------------------------------------------------------ MPS (cuda)
    def mps_percentage(self, units: int) -> int:
        """The smallest CUDA_MPS_ACTIVE_THREAD_PERCENTAGE whose cap covers `units` SMs."""
        return percentage_for_share(self.share_of(units))

    def units_of_percentage(self, percentage: int) -> int:
        """The SMs a cap of `percentage` gives: rounded down to whole TPCs, at least one."""
        return self.units_for(percentage / 100)


def percentage_for_share(share: float) -> int:
    """The smallest integer MPS percentage (1..100) whose cap is at least `share` of the device."""
    return max(1, min(100, math.ceil(share * 100 - 1e-6)))


def share_of_percentage(percentage: int) -> float:
    """The share a worker started with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=percentage has."""
    return percentage / 100


def device_sms(used: int, total: int, share: float) -> int:
    """The GPU's SM count from one worker's measurement: `total` (the SM count its context reports) and
    `used` (the SMs the probe's launch ran on) at its MPS `share`. If the context reports the whole GPU,
    a capped worker's probe runs on fewer SMs than that; if it reports the capped count (which NVIDIA's
    documentation leaves open), the probe fills it, and the whole GPU is about total / share. 0: unknown."""
    if total <= 0:
        return 0
    if 0 < share < 1 and used >= total:     # the smallest GPU of whole TPCs whose cap at `share` is `total`
        sms = math.ceil(total / share - 1e-6)
        return -(-sms // TPC_SMS) * TPC_SMS
    return total


# ---------------------------------------------------------------------------------------------- assignment

@dataclass(frozen=True, slots=True)
class PhaseUnits:
    """What one phase is given: the units, and how its worker is told (cores, or an MPS cap)."""

    units: int                          # cores / SMs
    share: float                        # units / the space's units: what the worker reports back
    cpu_ids: tuple[int, ...] = ()       # cpu: its cores; empty on cuda (host threads keep theirs)
    mps_percentage: int | None = None   # cuda: its CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; None on cpu


def core_set(cpus: Sequence[int], count: int, from_back: bool) -> tuple[int, ...]:
    """`count` of the stack's cores: from the front (prefill) or the back (decode)."""
    cpus = tuple(cpus)
    count = min(len(cpus), max(1, count))
    return cpus[len(cpus) - count:] if from_back else cpus[:count]


def phase_units(space: UnitSpace, units: int, cpus: Sequence[int] = (), from_back: bool = False) -> PhaseUnits:
    """How a phase holding `units` units is told so: its cores (cpu), or its MPS percentage (cuda)."""
    space.check_units(units)
    if space.backend == "cpu":
        if len(cpus) != space.num_units:
            raise ValueError(f"a cpu space of {space.num_units} cores needs that many stack cores, got {len(cpus)}")
        return PhaseUnits(units, space.share_of(units), core_set(cpus, units, from_back))
    return PhaseUnits(units, space.share_of(units), (), space.mps_percentage(units))


def assign(space: UnitSpace, prefill_share: float, decode_share: float,
           cpus: Sequence[int] = ()) -> tuple[PhaseUnits, PhaseUnits]:
    """Each phase's units for a pair of shares: prefill's cores from the front, decode's from the back."""
    return (phase_units(space, space.units_for(prefill_share), cpus, from_back=False),
            phase_units(space, space.units_for(decode_share), cpus, from_back=True))


# ---------------------------------------------------------------------------------------------- green contexts

def green_partition_units(units: int, min_partition: int, alignment: int, total: int) -> int:
    """The SMs a green context asked for `units` SMs gets: the driver rounds the count up to its
    alignment and its minimum partition (services.common.cuda_driver.SmResource), within the device."""
    step = max(1, alignment)
    rounded = -(-max(units, min_partition, 1) // step) * step
    return min(total, rounded)


def pick_partition(sizes: Sequence[int], units: int) -> int:
    """Which pre-created green partition serves a phase of `units` SMs: the index of the smallest that
    holds them all, else of the largest (a green stream is a cap, as an MPS percentage is)."""
    if not sizes:
        raise ValueError("no green partitions to pick from")
    fitting = [i for i, size in enumerate(sizes) if size >= units]
    if fitting:
        return min(fitting, key=lambda i: sizes[i])
    return max(range(len(sizes)), key=lambda i: sizes[i])
