"""Telling a process from a later one that got its pid: the kernel's start time of a pid."""
from __future__ import annotations

from pathlib import Path


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (None if gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) "; comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])                            # field 22 of proc(5)
