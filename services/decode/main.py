"""The decode worker process: admits hand-offs whose KV is already in the shared pool and generates one token per request per iteration.

`python -m services.decode.main --help`. A request's life here is told in `services.worker.loop`;
this module only picks the phase.
"""
from __future__ import annotations

import sys

from services.worker.config import Phase
from services.worker.main import run


def main() -> None:
    sys.exit(run(Phase.DECODE))


if __name__ == "__main__":
    main()
