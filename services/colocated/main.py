"""The colocated worker process: one engine doing chunked-prefill hybrid batches over a private KV pool: the baseline every comparison is made against.

`python -m services.colocated.main --help`. A request's life here is told in `services.worker.loop`;
this module only picks the phase.
"""
from __future__ import annotations

import sys

from services.worker.config import Phase
from services.worker.main import run


def main() -> None:
    sys.exit(run(Phase.COLOCATED))


if __name__ == "__main__":
    main()
