"""What one simulated run reports: per-request TTFT and TPOT summed up into attainment and percentiles.

Pure Python. A request meets TTFT when its first token came within the target of its arrival, and TPOT
when (finish - first token) / (output tokens - 1) is within the target (one output token: always).
A request that never got a first token or never finished (a run stopped early) meets neither.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.simulator import Simulation

INF = math.inf


@dataclass(slots=True)
class RunResult:
    """One system at one rate."""

    system: str
    rate_multiple: float
    rate_per_s: float
    requests: int
    finished: int
    rejected: int                          # could never fit (prompt over max_model_len or the pool)
    attainment: float                      # met both SLOs / all requests (unfinished ones count as misses)
    attainment_upper: float                # 1 - known misses / all requests: the most it could have reached
    ttft_attainment: float
    tpot_attainment: float
    early_stopped: bool
    ttft_ms: dict[str, float]              # p50, p90, p99 over requests with a first token
    tpot_ms: dict[str, float]              # p50, p90, p99 over requests with >= 2 output tokens
    sim_s: float                           # simulated seconds
    wall_s: float
    cpu_s: float                           # CPU time of this process (the machine may be shared)
    iterations: dict[str, int]
    preemptions: int
    share_changes: int
    mean_shares: dict[str, float]          # time-weighted prefill and decode shares (split)
    output_tokens_per_s: float
    throughput_per_s: float                # finished requests per simulated second
    goodput_per_s: float                   # requests that met both SLOs per simulated second
    prefix_hit_rate: float | None = None   # prefix caching: prompt tokens found cached / looked up (admissions)
    cached_prompt_tokens: int = 0          # those found cached: not prefilled

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def run_result(sim: "Simulation", t: float, wall_s: float, cpu_s: float) -> RunResult:
    """The per-request latencies of a finished (or stopped) simulation, at simulated time t (ms)."""
    slo, arrivals, n = sim.slo, sim.arrivals, len(sim.arrivals)
    ttfts, tpots = [], []
    ttft_ok = tpot_ok = both_ok = out_tokens = 0
    for idx in range(n):
        first, done = sim.first_ms[idx], sim.done_ms[idx]
        t_ok = first != INF and first - arrivals[idx] <= slo.ttft_ms
        if first != INF:
            ttfts.append(first - arrivals[idx])
        p_ok = False
        if done != INF:
            k = sim.out_tokens[idx]
            out_tokens += k
            if k > 1:
                tpot = (done - first) / (k - 1)
                tpots.append(tpot)
                p_ok = tpot <= slo.tpot_ms
            else:
                p_ok = True
        ttft_ok += t_ok
        tpot_ok += p_ok
        both_ok += t_ok and p_ok
    stopped = sim.finished + sim.rejected < n
    if sim.policy is not None and sim.share_time[2]:
        ticks = sim.share_time[2]
        mean = {"prefill": sim.share_time[0] / ticks, "decode": sim.share_time[1] / ticks}
    elif sim.system.shares is not None:
        mean = {"prefill": sim.system.shares.prefill, "decode": sim.system.shares.decode}
    else:
        mean = {}
    sim_s = t / 1000.0
    schedulers = [e.scheduler for e in sim.engines]
    queries, hits = sum(s.prefix_query_tokens for s in schedulers), sum(s.prefix_hit_tokens for s in schedulers)
    return RunResult(
        system=sim.system.name, rate_multiple=sim.rate_multiple, rate_per_s=round(sim.rate_per_s, 4),
        requests=n, finished=sim.finished, rejected=sim.rejected, attainment=both_ok / n,
        attainment_upper=1 - sim.failed / n,
        ttft_attainment=ttft_ok / n, tpot_attainment=tpot_ok / n, early_stopped=stopped,
        ttft_ms=_percentiles(ttfts), tpot_ms=_percentiles(tpots), sim_s=round(sim_s, 3), wall_s=round(wall_s, 3),
        cpu_s=round(cpu_s, 3),
        iterations={e.name: e.iterations for e in sim.engines}, preemptions=sim.preemptions,
        share_changes=sim.share_changes, mean_shares={k: round(v, 4) for k, v in mean.items()},
        output_tokens_per_s=round(out_tokens / sim_s, 2) if sim_s > 0 else 0.0,
        throughput_per_s=round(sim.finished / sim_s, 4) if sim_s > 0 else 0.0,
        goodput_per_s=round(both_ok / sim_s, 4) if sim_s > 0 else 0.0,
        prefix_hit_rate=round(hits / queries, 4) if queries else None, cached_prompt_tokens=hits)


def _percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50, p90, p99 (ms); empty when there are none."""
    if not values:
        return {}
    values.sort()
    n = len(values)
    return {f"p{q}": round(values[max(0, math.ceil(q / 100 * n) - 1)], 3) for q in (50, 90, 99)}
