"""Compute share on the CPU backend: a set of cores per worker, changed live at an iteration boundary.

`os.sched_setaffinity(0, ...)` pins only the calling thread, so every thread of the process
(torch's intra-op pool included) is pinned through /proc/self/task; torch's thread count follows
the number of cores so no two of its threads fight over one core.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CpuShare:
    """A worker's cores."""

    cpu_ids: tuple[int, ...]          # cores this worker may run on
    num_cores_total: int              # cores of the stack, to express the share as a fraction

    @property
    def fraction(self) -> float:
        return len(self.cpu_ids) / self.num_cores_total


def apply_cpu_share(cpu_ids: tuple[int, ...]) -> None:
    """Pin every thread of this process to `cpu_ids` and size torch's pool to match."""
    cpus = set(cpu_ids)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass    # a thread that just exited
    torch.set_num_threads(len(cpus))


def current_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))
