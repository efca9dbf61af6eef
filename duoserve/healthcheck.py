"""`python -m duoserve.healthcheck HOST:PORT`: one grpc.health.v1 Check, as a container health check.

Exit status 0 when the server's overall service ("") says SERVING; 1 for anything else (NOT_SERVING
while a process loads its model, no server on the port, a timeout), with the status on stderr so
`docker inspect` shows why. Every duoserve server (arena, prefill, decode, colocated, gateway,
orchestrator) answers grpc.health.v1, so one probe fits all of them. No torch: it runs every few
seconds in each container.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from duoserve.stack import HEALTHY, grpc_health


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m duoserve.healthcheck",
                                description="exit 0 when the gRPC server at HOST:PORT reports SERVING")
    p.add_argument("target", help="HOST:PORT of a duoserve gRPC server")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    p.add_argument("--tls-ca", default=None,
                   help="the server speaks TLS: trust this certificate (the server's own, whatever host it names)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    status = grpc_health(args.target, timeout_s=args.timeout, tls_cert=args.tls_ca)
    if status == HEALTHY:
        return 0
    print(f"{args.target}: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
