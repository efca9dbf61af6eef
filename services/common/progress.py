"""Progress bars for long work (model conversion, `bench serve`/`compare`/`peer`, `duoserve simulate`).

A tqdm bar on stderr, drawn only when stderr is a terminal: in logs, pipes and CI (and under pytest's
capture) the work is quiet, and the commands' own result lines are all that is printed.
"""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True) -> tqdm:
    """A bar over `iterable` (or updated by hand up to `total`); disabled off a terminal or when not `enabled`."""
    stderr = sys.stderr
    shown = enabled and stderr is not None and stderr.isatty()
    return tqdm(iterable, total=total, desc=desc or None, unit=unit, file=stderr, disable=not shown,
                dynamic_ncols=True, leave=False)
