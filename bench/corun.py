"""`make gpu-check`'s co-residency measurement: a prefill-like and a decode-like process at overlapping MPS
caps, each alone, then both together; the slowdowns fit the performance model's co-residency parameter
(orchestrator/coresidency.py) and are written to the calibration file the orchestrator and
`duoserve simulate` read (--coresidency-calibration).

  prefill   a bf16 GEMM of a 2048-token batch through one MLP up-projection of Llama-3.1-8B
            (2048 x 4096 x 28672): compute-bound
  decode    a bf16 GEMV-like product of 16 rows with 512 MiB of weights: bandwidth-bound

Each runs as its own MPS client (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = its cap), warms up, says "ready",
waits for "go" on stdin (so "together" starts both at once), loops its kernel for `seconds` timing each
call with CUDA events, and prints one JSON line: the median ms per call, its FLOPs and bytes.

The pure parts (the demand of a kernel from its work and time, the CoRun from the children's results, the
rows of the table) are tested without a GPU; the rest needs one.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from orchestrator.coresidency import CoRun, Demand
from services.common.shares import UnitSpace

KERNELS = {
    # role: (rows, k, n): rows x k activations times k x n weights, bf16
    "prefill": (2048, 4096, 28672),
    "decode": (16, 8192, 32768),
}


@dataclass(frozen=True, slots=True)
class KernelResult:
    """One child's report."""

    role: str
    percentage: int
    median_ms: float
    flops: float          # per call
    nbytes: float         # per call (weights, activations in and out)


def kernel_work(role: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of the role's kernel."""
    m, k, n = KERNELS[role]
    return 2.0 * m * k * n, 2.0 * (m * k + k * n + m * n)


def units_for(percentage: int, num_sms: int) -> int:
    """SMs an MPS percentage gives, rounded down to whole TPCs (2 SMs), at least one TPC (services.common.shares)."""
    return UnitSpace.cuda(num_sms).units_of_percentage(percentage)


def kernel_demand(result: KernelResult, peak_flops: float, peak_bw: float, num_sms: int) -> Demand:
    """The Demand of a kernel from its work and its time alone: compute = FLOP/s over the peak of the SMs
    its cap gives, bandwidth = bytes/s over the device's peak; the bound resource's fraction is the larger,
    and the two are scaled down together when they sum past 1 (a kernel overlaps them)."""
    seconds = result.median_ms / 1000.0
    share = units_for(result.percentage, num_sms) / num_sms
    compute = result.flops / seconds / (peak_flops * share)
    bandwidth = min(1.0, result.nbytes / seconds / peak_bw)
    memory = bandwidth
    total = compute + memory
    if total > 1.0:
        compute, memory = compute / total, memory / total
    return Demand(compute=min(1.0, compute), memory=memory, bandwidth=bandwidth)


def corun(prefill_alone: KernelResult, decode_alone: KernelResult, prefill_together: KernelResult,
          decode_together: KernelResult, peak_flops: float, peak_bw: float, num_sms: int) -> CoRun:
    """The calibration record of one pair of caps."""
    return CoRun(units_for(prefill_alone.percentage, num_sms), units_for(decode_alone.percentage, num_sms), num_sms,
                 prefill_alone.median_ms, decode_alone.median_ms, prefill_together.median_ms,
                 decode_together.median_ms, kernel_demand(prefill_alone, peak_flops, peak_bw, num_sms),
                 kernel_demand(decode_alone, peak_flops, peak_bw, num_sms))


def parse_caps(text: str) -> list[tuple[int, int]]:
    """"100/30,70/50" -> [(100, 30), (70, 50)]: prefill/decode MPS percentages that overlap (sum > 100)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        p, _, d = part.partition("/")
        pair = (int(p), int(d))
        if not all(1 <= x <= 100 for x in pair) or sum(pair) <= 100:
            raise ValueError(f"--corun-caps {part!r}: two percentages in 1..100 that sum past 100 (overlapping caps)")
        out.append(pair)
    if not out:
        raise ValueError("--corun-caps: give at least one prefill/decode pair, e.g. 100/30")
    return out


def rows(runs: Sequence[CoRun], residual: float | None, path: str) -> list[tuple[str, str]]:
    """(check, result) rows for gpu-check's table."""
    out = []
    for r in runs:
        p, d = r.measured()
        out.append((f"co-run {r.prefill_units}/{r.decode_units} SMs",
                    f"prefill {r.prefill_alone_ms:.2f} -> {r.prefill_together_ms:.2f} ms (x{p:.2f}), "
                    f"decode {r.decode_alone_ms:.2f} -> {r.decode_together_ms:.2f} ms (x{d:.2f})"))
    if residual is not None:
        out.append(("co-residency residual", f"{residual:.3f} (prior 0.26), written to {path}"))
    return out


# ---------------------------------------------------------------------------------------------- on the GPU

def child(role: str, seconds: float) -> dict[str, Any]:
    """In an MPS client: the role's kernel in a loop after "go", the median call time."""
    import torch
    m, k, n = KERNELS[role]
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, w)
    torch.cuda.synchronize()
    print("ready", flush=True)
    sys.stdin.readline()
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, w)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    flops, nbytes = kernel_work(role)
    return {"role": role, "percentage": int(os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100")),
            "median_ms": times[len(times) // 2], "flops": flops, "nbytes": nbytes, "calls": len(times)}


def _start(role: str, percentage: int, seconds: float, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.corun", role, str(seconds)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_ready(proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready and proc.stdout.readline().strip() == "ready":
            return
        if proc.poll() is not None:
            raise RuntimeError(f"co-run child exited: {proc.stderr.read().strip()[-300:]}")
    proc.kill()
    raise RuntimeError("co-run child not ready in time")


def run_together(specs: Sequence[tuple[str, int]], seconds: float, env_of) -> list[KernelResult]:
    """Start one child per (role, percentage), release them at once, collect their reports."""
    procs = [_start(role, pct, seconds, env_of(pct)) for role, pct in specs]
    try:
        for proc in procs:
            _wait_ready(proc)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=seconds + 120)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"co-run child failed: {stderr.strip()[-300:]}")
            raw = json.loads(lines[-1])
            out.append(KernelResult(raw["role"], raw["percentage"], raw["median_ms"], raw["flops"], raw["nbytes"]))
        return out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def measure(caps: Sequence[tuple[int, int]], seconds: float, num_sms: int, env_of) -> list[CoRun]:
    """Peaks at 100% alone, then per pair of caps each alone and both together."""
    [prefill_peak] = run_together([("prefill", 100)], seconds, env_of)
    [decode_peak] = run_together([("decode", 100)], seconds, env_of)
    peak_flops = prefill_peak.flops / (prefill_peak.median_ms / 1000.0)
    peak_bw = decode_peak.nbytes / (decode_peak.median_ms / 1000.0)
    runs = []
    for p, d in caps:
        [p_alone] = run_together([("prefill", p)], seconds, env_of)
        [d_alone] = run_together([("decode", d)], seconds, env_of)
        p_together, d_together = run_together([("prefill", p), ("decode", d)], seconds, env_of)
        runs.append(corun(p_alone, d_alone, p_together, d_together, peak_flops, peak_bw, num_sms))
    return runs


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], float(sys.argv[2]))), flush=True)
