"""The prefill worker process: reads the prefill queue, writes prompt KV into the shared pool, samples the first token and hands each request to decode by block ids.

`python -m services.prefill.main --help`. A request's life here is told in `services.worker.loop`;
this module only picks the phase.
"""
from __future__ import annotations

import sys

from services.worker.config import Phase
from services.worker.main import run


def main() -> None:
    sys.exit(run(Phase.PREFILL))


if __name__ == "__main__":
    main()
