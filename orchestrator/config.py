"""The orchestrator's configuration: built once in `main` from the command line and the environment."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Sequence

from duoserve.credentials import ADMIN_TOKEN_ENV, redis_url_from_env, secret_from_env
from services.common.tls import TlsFiles


def _cpu_list(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.append(int(part))
    return tuple(cpus)


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    """One orchestrator process."""

    redis_url: str                     # where the queues, reports and its own state live
    key_prefix: str                    # Redis key space of the stack
    port: int                          # Admin gRPC (+ health, reflection)
    metrics_port: int = 0              # Prometheus /metrics; 0 disables
    admin_token: str = field(default="", repr=False)   # Admin calls need `authorization: Bearer <token>`
                                       # with this token or the stack's secret (neither set: open)
    secret: str = field(default="", repr=False)        # the stack's secret: sent to the workers with
                                       # SetComputeShare, accepted by the Admin API
    tls: TlsFiles | None = None        # the Admin API over TLS (duoctl --tls-ca)
    stack_cpus: tuple[int, ...] = ()   # the cores shared by prefill and decode (CPU backend)
    device: str = "cpu"                # the workers' backend: "cpu" (shares are cores) or "cuda" (SMs)
    num_sms: int = 0                   # cuda: the GPU's SMs; 0: as the workers measured them (SM probe/driver)
    tick_ms: int = 250                 # how often the policy runs
    refit_every: int = 8               # ticks between least-squares refits
    overlap: float = 0.5               # prefill's cap may reach into decode's cores by this share
    switch_cost_ms: float = 1.0        # CPU: a share change is a sched_setaffinity at a boundary
    ttft_ms: float = 2000.0            # default SLO until an operator sets one
    tpot_ms: float = 200.0
    percentile: float = 0.9
    prefer: str = "tpot"
    policy: str = "auto"               # auto | static | manual
    coresidency_calibration: str | None = None   # `make gpu-check`'s co-residency file (GPU); None: the prior
    persist_ticks: int = 3             # ticks in a row a need must be seen before the shares move
    min_dwell_ms: float = 2000.0       # no move sooner than this after the last (nor than 4 switch costs)
    comfort_headroom: float = 2.0      # queued work with this much SLO headroom needs no move

    def __post_init__(self) -> None:
        if self.tick_ms < 10:
            raise ValueError("tick_ms must be at least 10")
        if self.prefer not in ("ttft", "tpot"):
            raise ValueError("prefer must be ttft or tpot")
        if self.policy not in ("auto", "static", "manual"):
            raise ValueError("policy must be auto, static or manual")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {self.device!r}")
        if self.num_sms < 0:
            raise ValueError("num_sms must be >= 0")


def parse_args(argv: Sequence[str] | None = None) -> OrchestratorConfig:
    env = os.environ
    p = argparse.ArgumentParser(prog="duoserve-orchestrator", description="duoserve orchestrator: SLO-aware shares")
    p.add_argument("--redis-url", default=env.get("REDIS_URL"), required=env.get("REDIS_URL") is None,
                   help="env REDIS_URL (`duoserve up` hands it so: it carries the stack's Redis password)")
    p.add_argument("--key-prefix", default=env.get("DUOSERVE_KEY_PREFIX", "duo"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--admin-token", default=None,
                   help="bearer token the Admin API requires besides the stack's secret (DUOSERVE_SECRET); "
                        "prefer env DUOSERVE_ADMIN_TOKEN (or DUOSERVE_ADMIN_TOKEN_FILE): a flag shows in `ps`")
    p.add_argument("--tls-cert", default=env.get("DUOSERVE_TLS_CERT"), help="PEM certificate chain: Admin API over TLS")
    p.add_argument("--tls-key", default=env.get("DUOSERVE_TLS_KEY"), help="its PEM private key")
    p.add_argument("--cpus", type=_cpu_list, default=tuple(sorted(os.sched_getaffinity(0))))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="the workers' backend: shares are cores (cpu) or SMs in TPC steps with the GPU prior (cuda)")
    p.add_argument("--num-sms", type=int, default=0,
                   help="cuda: the GPU's SM count (default: as the workers measure it)")
    p.add_argument("--tick-ms", type=int, default=250)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--ttft-ms", type=float, default=2000.0)
    p.add_argument("--tpot-ms", type=float, default=200.0)
    p.add_argument("--percentile", type=float, default=0.9)
    p.add_argument("--prefer", choices=["ttft", "tpot"], default="tpot")
    p.add_argument("--policy", choices=["auto", "static", "manual"], default="auto")
    p.add_argument("--coresidency-calibration", default=None,
                   help="co-residency calibration JSON from `make gpu-check` (GPU; default: the published prior)")
    p.add_argument("--persist-ticks", type=int, default=3, help="ticks a need must persist before a move")
    p.add_argument("--min-dwell-ms", type=float, default=2000.0, help="least time between two moves")
    p.add_argument("--comfort-headroom", type=float, default=2.0,
                   help="SLO headroom at which queued work needs no move (docs/performance-model.md, Hysteresis)")
    a = p.parse_args(argv)
    return OrchestratorConfig(redis_url=redis_url_from_env(env, a.redis_url), key_prefix=a.key_prefix, port=a.port,
                              metrics_port=a.metrics_port, admin_token=a.admin_token or secret_from_env(env, ADMIN_TOKEN_ENV),
                              secret=secret_from_env(env), tls=TlsFiles.of(a.tls_cert, a.tls_key), stack_cpus=a.cpus,
                              device=a.device, num_sms=a.num_sms,
                              tick_ms=a.tick_ms, overlap=a.overlap, ttft_ms=a.ttft_ms, tpot_ms=a.tpot_ms,
                              percentile=a.percentile, prefer=a.prefer, policy=a.policy,
                              coresidency_calibration=a.coresidency_calibration, persist_ticks=a.persist_ticks,
                              min_dwell_ms=a.min_dwell_ms, comfort_headroom=a.comfort_headroom)
