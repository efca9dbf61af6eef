"""What a worker's compute share actually gives it: SMs on the cuda backend, cores on the cpu backend.

A share is a cap (an MPS active thread percentage, or a core set); this says how many units the
cap really yields, so `duoctl status` can show it beside the share. On CUDA it is measured by the
SM probe (`services/common/sm_probe.py`) in the worker's own process and context, so it sees the
worker's MPS limit (without the probe, the device's SM count still comes from the driver through
cuda-python, `services/common/cuda_driver.py`); on the CPU it is the worker's affinity mask against the stack's cores.
Measured after start-up and after each share change, never per iteration.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.common import cuda_driver
from services.common.sm_probe import DEFAULT_LIBRARY, probe_sms


@dataclass(frozen=True, slots=True)
class ComputeUnits:
    """The units a worker's share gives it."""

    kind: str                  # "sm" (cuda: measured by the probe) or "core" (cpu: the affinity mask)
    used: int                  # units this worker may run on now; 0 when unknown
    total: int                 # SMs of the device (as the worker's context sees it) / cores of the stack; 0 unknown
    error: str | None = None   # why used is unknown (cuda: the probe's reason, e.g. no driver); None when known


def _cuda_index(device: str) -> int | None:
    """The CUDA device index of a torch device string ("cuda" -> 0, "cuda:1" -> 1), None if not CUDA."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    return int(index) if index else 0


def probe_compute_units(device: str, cpu_ids: tuple[int, ...], stack_cpus: tuple[int, ...],
                        library: Path = DEFAULT_LIBRARY) -> ComputeUnits:
    """SMs for a worker whose torch device is CUDA (the probe runs here, in its context), else cores.

    `cpu_ids` are the worker's cores (empty: whatever its affinity mask allows now) and `stack_cpus`
    every core the stack may use.
    """
    index = _cuda_index(device)
    if index is None:
        cores = cpu_ids or tuple(os.sched_getaffinity(0))
        return ComputeUnits("core", len(cores), len(stack_cpus) or len(cores))
    result = probe_sms(index, library=library)
    if result.ok:
        return ComputeUnits("sm", result.num_sms_used, result.num_sms_total)
    # No probe (not built, or it failed): the driver still says how many SMs the device has
    # (cuda-python, services.common.cuda_driver); what this worker's cap gives stays unknown.
    try:
        total = cuda_driver.sm_count(index)
    except (cuda_driver.CudaDriverError, ValueError) as e:
        return ComputeUnits("sm", 0, 0, f"{result.error}; driver: {e}")
    return ComputeUnits("sm", 0, total, result.error)
