"""`duoserve bench validate-sim`: the simulator against the real CPU stack, on the same requests.

A validation's life:
  up        a split stack on this machine's CPU (`duoserve up --detach` through duoserve.stack), with
            the orchestrator; its policy set to the one under test ("static": 2 cores -> prefill 0,
            decode 1; "auto": the dynamic policy with the SLOs)
  calibrated unmeasured requests: prompts of many lengths one at a time, then a burst of short ones
            (first-call costs; the orchestrator's fit sees prefill sizes and decode batch sizes)
  measured  bench serve's run of the workload: per request its send time, prompt and output length,
            TTFT and TPOT as the client saw them
  fitted    the orchestrator's online fit of the performance model (GetModelFit), from the iteration
            timings the workers reported during warm-up and the run: the CPU calibration
  down      the stack stopped
  simulated the same requests (the run's actual send times and lengths) through the simulator, with
            that calibration and the stack's settings (`orchestrator.sim_calibration`, gpu "cpu")
  compared  p50 and p90 of TTFT and TPOT, real against simulated, as relative errors; the validation
            passes when each is within the tolerance (default 20%)

Percentiles on both sides are numpy's linear interpolation over the same requests (bench serve's
definition), so the comparison is request set against request set, not two estimators.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.serve import Result, run_benchmark
from bench.workloads import arrival_from_args, workload_from_args

CALIBRATION_REQUESTS = 8            # per calibration phase (prefill sizes, decode batch sizes)
QUANTILES = (50, 90)
METRICS = ("ttft", "tpot")


@dataclass(frozen=True, slots=True)
class Comparison:
    """One percentile of one metric, real against simulated."""

    metric: str            # "ttft" or "tpot"
    quantile: int          # 50 or 90
    real_ms: float         # the client's measurement through the gateway
    sim_ms: float          # the simulator's, same requests
    tolerance: float       # relative error allowed

    @property
    def rel_error(self) -> float:
        return (self.sim_ms - self.real_ms) / self.real_ms if self.real_ms > 0 else math.inf

    @property
    def ok(self) -> bool:
        return abs(self.rel_error) <= self.tolerance


def _percentiles(values_ms: Sequence[float]) -> dict[int, float]:
    return {q: float(np.percentile(values_ms, q)) for q in QUANTILES} if values_ms else {}


def real_latencies(result: Result) -> dict[str, list[float]]:
    """TTFT and TPOT (ms) of each successful request, as bench serve defines them."""
    ok = [r for r in result.records if r.success]
    return {"ttft": [r.ttft_s * 1000 for r in ok],
            "tpot": [r.tpot_s * 1000 for r in ok if r.output_tokens > 1]}


def trace_of(result: Result) -> list[Any]:
    """The requests as they were really sent: send offset, the server's prompt count, tokens produced."""
    from orchestrator.sim_trace import TraceRequest
    ok = sorted((r for r in result.records if r.success), key=lambda r: r.sent_s)
    t0 = ok[0].sent_s
    return [TraceRequest(r.sent_s - t0, r.prompt_len, max(1, r.output_tokens)) for r in ok]


def simulated_latencies(trace: Sequence[Any], fit_path: Path, policy: str, slo_ttft_ms: float,
                        slo_tpot_ms: float, cpu_cores: int, num_kv_blocks: int | None,
                        loop_gap_ms: float | None = None) -> tuple[dict[str, list[float]], dict]:
    """The simulator over `trace` at its own pace (rate multiple 1); TTFT and TPOT (ms) per request.
    `loop_gap_ms`: the stack's measured time between back-to-back iterations (None: the profile's)."""
    from dataclasses import replace
    from orchestrator.policy import SLO, Shares
    from orchestrator.sim_calibration import calibrate
    from orchestrator.sim_trace import base_rate
    from orchestrator.simulator import SimOptions, Simulation, System

    cal = calibrate("cpu", "smollm2-135m", cpu_cores=cpu_cores, coefficients_path=fit_path,
                    num_kv_blocks=num_kv_blocks)
    if loop_gap_ms is not None:
        cal = replace(cal, profile=replace(cal.profile, loop_gap_ms=loop_gap_ms))
    p, d = cal.profile.initial_split
    system = System(f"split-{policy}", "split", shares=Shares(p, d, cal.profile.initial_budget),
                    dynamic=policy == "auto")
    options = SimOptions(slo=SLO(ttft_ms=slo_ttft_ms, tpot_ms=slo_tpot_ms), early_stop=False)
    sim = Simulation(system, cal, options, trace, 1.0, base_rate(trace))
    run = sim.run()
    ttft, tpot = [], []
    for i in range(len(trace)):
        first, done = sim.first_ms[i], sim.done_ms[i]
        if first != math.inf:
            ttft.append(first - sim.arrivals[i])
        if done != math.inf and sim.out_tokens[i] > 1:
            tpot.append((done - first) / (sim.out_tokens[i] - 1))
    return {"ttft": ttft, "tpot": tpot}, run.as_dict()


def compare(real: dict[str, list[float]], sim: dict[str, list[float]], tolerance: float) -> list[Comparison]:
    out = []
    for metric in METRICS:
        r, s = _percentiles(real[metric]), _percentiles(sim[metric])
        for q in QUANTILES:
            if q in r and q in s:
                out.append(Comparison(metric, q, r[q], s[q], tolerance))
    return out


def format_table(rows: Sequence[Comparison], words: str) -> str:
    lines = [f"simulator vs the real CPU stack: {words}", "",
             f"{'metric':<8}{'real (ms)':>12}{'simulated (ms)':>16}{'error':>9}  within",
             "-" * 52]
    for c in rows:
        lines.append(f"{c.metric.upper() + ' p' + str(c.quantile):<8}{c.real_ms:>12.1f}{c.sim_ms:>16.1f}"
                     f"{c.rel_error * 100:>8.1f}%  {'yes' if c.ok else 'NO'} (±{c.tolerance * 100:.0f}%)")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class RealRun:
    """What the real stack gave: the measured requests and what the simulator needs of the stack."""

    result: Result                     # bench serve's run: every request's times and lengths
    fit: dict[str, Any]                # the orchestrator's GetModelFit, as `duoctl model --json` prints it
    num_kv_blocks: int | None          # the stack's KV pool
    samples: list[dict[str, Any]]      # every IterationSample the workers wrote (for the loop gaps)


def measure_on(state: Any, specs: Sequence[Any], arrival: Any, words: str, policy: str, slo_ttft_ms: float,
               slo_tpot_ms: float, progress: bool, say: Callable[[str], None]) -> RealRun:
    """On a running split stack (its `duoserve.stack.StackState`): set the policy, calibrate, run the
    workload, read the fit. Leaves the policy as it found it."""
    from duoserve.credentials import secret_of
    from duoserve.duoctl import AdminClient, _as_dict
    from duoserve.v1 import admin_pb2 as admin_pb

    orch = next((p for p in state.processes if p.name == "orchestrator"), None)
    if orch is None:
        raise RuntimeError("validate-sim needs a split stack with its orchestrator (the model fit)")
    admin = AdminClient(f"127.0.0.1:{orch.port}", token=secret_of(state.secret_file))
    before = admin.call("GetStatus", admin_pb.GetStatusRequest())
    admin.call("SetSLO", admin_pb.SLO(ttft_ms=slo_ttft_ms, tpot_ms=slo_tpot_ms, percentile=90, prefer="tpot"))
    admin.call("SetPolicy", admin_pb.SetPolicyRequest(mode=policy))
    try:
        calibrate_stack(state.gateway_target)
        say(f"calibrated with {2 * CALIBRATION_REQUESTS} requests; running {len(specs)}")
        result = run_benchmark(state.gateway_target, specs, arrival, warmup=0, slo_ttft_ms=slo_ttft_ms,
                               slo_tpot_ms=slo_tpot_ms, progress=progress, label="validate-sim", workload=words)
        fit = _as_dict(admin.call("GetModelFit", admin_pb.GetModelFitRequest()))
        status = admin.call("GetStatus", admin_pb.GetStatusRequest())
    finally:
        admin.call("SetSLO", before.slo)
        admin.call("SetPolicy", admin_pb.SetPolicyRequest(mode=before.policy.mode))
    return RealRun(result, fit, status.kv_blocks_total or None, read_samples(state.redis_url, state.key_prefix))


def measure_real(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[RealRun, str]:
    """Start a split stack of its own, measure on it, stop it."""
    from duoserve import stack
    from duoserve.stack import Mode, StackConfig

    specs, words = workload_from_args(args)
    config = StackConfig(
        state_dir=args.state_dir.expanduser(), cache_dir=args.cache_dir.expanduser(), name="validate-sim",
        mode=Mode.SPLIT, model=args.model, num_kv_blocks=args.num_kv_blocks,
        startup_timeout_s=args.startup_timeout, with_orchestrator=True,
        prefix_caching=False)         # the simulator does not model prefix caching (yet): compare like with like
    stack.up(config, detach=True, say=say, out=io.StringIO())
    try:
        real = measure_on(stack.read_state(config.state_path), specs, arrival_from_args(args), words, args.policy,
                          args.slo_ttft_ms, args.slo_tpot_ms, not args.no_progress, say)
    finally:
        stack.down(config.state_dir, config.name, stop_timeout_s=config.stop_timeout_s, say=say)
    return real, words


def calibrate_stack(target: str) -> None:
    """Unmeasured requests that give the orchestrator's fit the range it needs: prompts of 20 to 380
    tokens one at a time (prefill), then a burst of short ones together (decode batches of 1 to 8)."""
    from bench.datasets import Arrival, random_requests
    one_by_one = random_requests(CALIBRATION_REQUESTS, 200, 8, 0.9, seed=7)
    run_benchmark(target, one_by_one, Arrival("poisson", math.inf), max_concurrency=1, warmup=0, progress=False,
                  run=101)        # not the measured run's prompts (prefix caching)
    burst = random_requests(CALIBRATION_REQUESTS, 64, 24, 0.5, seed=8)
    run_benchmark(target, burst, Arrival("poisson", math.inf), warmup=0, progress=False, run=102)


def read_samples(redis_url: str, key_prefix: str) -> list[dict[str, Any]]:
    """Every IterationSample the workers wrote during the run (the capped timings stream)."""
    import redis

    from services.common import stream_entries
    from services.common.contracts import IterationSample, KeySpace
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(KeySpace(key_prefix).timings)
    finally:
        client.close()
    return [asdict(stream_entries.read(IterationSample, fields)) for _, fields in entries]


def loop_gaps(samples: Sequence[dict[str, Any]], max_gap_ms: float = 100.0) -> dict[str, dict[str, float]]:
    """Per phase: how long the loop spent between two back-to-back iterations outside the timed part
    (Redis reads and writes, cancels, admission): the next iteration's start - this one's end."""
    out: dict[str, dict[str, float]] = {}
    for phase in sorted({s["phase"] for s in samples}):
        mine = [s for s in samples if s["phase"] == phase]
        gaps = [(b["time"] - a["time"]) * 1000 - b["elapsed_ms"] for a, b in zip(mine, mine[1:])]
        gaps = [g for g in gaps if -5 < g < max_gap_ms]
        if gaps:
            out[phase] = {"samples": len(mine), "median_elapsed_ms": float(np.median([s["elapsed_ms"] for s in mine])),
                          "back_to_back": len(gaps), "median_gap_ms": float(np.median(gaps)),
                          "p90_gap_ms": float(np.percentile(gaps, 90))}
    return out


def validate(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    real, words = measure_real(args, say)
    report = judge(real, words, args.policy, args.tolerance, args.cpu_cores)
    return report | {"wall_s": round(time.monotonic() - started, 1)}


def judge(real: RealRun, words: str, policy: str, tolerance: float, cpu_cores: int) -> dict[str, Any]:
    """Simulate the requests of `real` as they were sent, and compare the percentiles."""
    result = real.result
    failed = [r.error for r in result.records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed on the real stack, e.g. {failed[0]}")
    gaps = loop_gaps(real.samples)
    loop_gap = gaps["decode"]["median_gap_ms"] if "decode" in gaps else None
    with tempfile.TemporaryDirectory() as tmp:
        fit_path = Path(tmp) / "fit.json"
        fit_path.write_text(json.dumps(real.fit))
        sim, run = simulated_latencies(trace_of(result), fit_path, policy, result.metrics.slo_ttft_ms or 1e9,
                                       result.metrics.slo_tpot_ms or 1e9, cpu_cores, real.num_kv_blocks, loop_gap)
    rows = compare(real_latencies(result), sim, tolerance)
    return {"workload": words, "policy": policy, "tolerance": tolerance,
            "passed": bool(rows) and all(c.ok for c in rows),
            "comparisons": [{"metric": c.metric, "quantile": c.quantile, "real_ms": round(c.real_ms, 2),
                             "sim_ms": round(c.sim_ms, 2), "rel_error": round(c.rel_error, 4), "ok": c.ok}
                            for c in rows],
            "fit": real.fit, "loop_gaps": gaps, "sim_run": run, "real_metrics": result.to_json()["metrics"],
            "table": format_table(rows, words)}


def run_from_args(args: argparse.Namespace) -> int:
    if not 0 < args.tolerance < 1:
        raise ValueError("--tolerance must be in (0, 1), e.g. 0.2")
    if args.dataset == "multi-turn":
        raise ValueError("validate-sim: the simulator has no multi-turn workload (yet); use azure-conv or random")

    def say(message: str) -> None:
        print(f"validate-sim: {message}", file=sys.stderr, flush=True)

    report = validate(args, say)
    print(report["table"])
    if args.output is not None:
        args.output.write_text(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=1))
        say(f"wrote {args.output}")
    print("PASS: every percentile within the tolerance" if report["passed"]
          else "FAIL: some percentile is outside the tolerance")
    return 0 if report["passed"] else 1
