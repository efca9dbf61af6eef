"""One simulated worker: its scheduler, its input queue and the iteration in flight; and the tokens
it samples (always 0: lengths come from the trace, and prompts' content from orchestrator/sim_arrivals.py).

Pure Python; `orchestrator.simulator` drives it.
"""
from __future__ import annotations

import collections
import math

from orchestrator.coresidency import IDLE, Demand
from services.engine.scheduler import Scheduler, SchedulerOutput
from services.engine.sequence import Sequence as Seq

INF = math.inf


class _Sampled(dict):
    """postprocess's `sampled` mapping: token 0 for every request (no EOS: lengths come from the trace)."""

    def __missing__(self, key: str) -> int:
        return 0


SAMPLED = _Sampled()


class Engine:
    """One worker: its scheduler, its input queue and the iteration in flight."""

    __slots__ = ("name", "phase", "scheduler", "inbox", "batch", "busy_until", "units", "pending_units",
                 "pending_budget", "mem_frac", "demand", "iterations", "other", "max_num_seqs")

    def __init__(self, name: str, phase: str, scheduler: Scheduler, units: float) -> None:
        self.name, self.phase, self.scheduler = name, phase, scheduler
        self.inbox: collections.deque[Seq] = collections.deque()   # the Redis stream it reads
        self.batch: SchedulerOutput | None = None                  # the iteration in flight
        self.busy_until = INF                                      # its end; INF when idle
        self.units = units                                         # what its cap buys
        self.pending_units: float | None = None                    # a new share, from the next boundary
        self.pending_budget: int | None = None
        self.mem_frac = 0.0        # share of the device's bandwidth its iteration in flight draws
        self.demand: Demand = IDLE  # what its iteration in flight asks of the device (co-residency)
        self.iterations = 0
        self.other: Engine | None = None
        self.max_num_seqs = scheduler.config.max_num_seqs
