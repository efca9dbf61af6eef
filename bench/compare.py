"""`duoserve bench compare`: the same workload against each serving configuration, over request rates.

A configuration's life here:
  up        its own stack (`duoserve up --detach` through duoserve.stack): colocated chunked prefill at
            chunk size c, or split with the orchestrator
  set       split-static: Admin SetPolicy("static") (the initial halves: 2 cores -> prefill 0, decode 1);
            split-dynamic: Admin SetSLO(the SLOs, percentile = attainment) and SetPolicy("auto")
  warm      a few unmeasured requests (first-call costs; the orchestrator's model gets samples)
  swept     bench serve's run at each rate in turn, the same requests and seed each time
  down      the stack stopped (also when a run fails)

Then, per configuration, the highest rate at which `attainment` of requests meet both SLOs:
the first crossing of the target, linearly interpolated in rate between the last rate that meets
it and the next that does not; "at least r_max" when every rate meets it, "below r_min" when none
does. Ratios are against the best colocated configuration.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.conversations import is_conversations
from bench.serve import format_result, run_benchmark
from bench.workloads import Workload, arrival_from_args, workload_from_args

WARMUP_REQUESTS = 4


@dataclass(frozen=True, slots=True)
class Setup:
    """One serving configuration of the comparison."""

    name: str                     # "colocated-c512", "split-static", "split-dynamic"
    mode: str                     # "colocated" or "split"
    chunk_size: int | None = None # colocated: prompt tokens per hybrid iteration
    policy: str | None = None     # split: the orchestrator's policy, "static" or "auto"
    prefix_caching: bool = True   # the workers reuse cached prompt prefixes (off: `duoserve up --no-prefix-caching`)


@dataclass(frozen=True, slots=True)
class MaxRate:
    """The highest rate meeting the attainment target, and how it was found."""

    value: float | None           # req/s; None when even the lowest rate misses
    how: str                      # "interpolated", "exact" (a measured rate), "at least" (all met), "below" (none met)

    def text(self) -> str:
        if self.how == "below":
            return f"< {self.value:g}" if self.value is not None else "n/a"
        prefix = ">= " if self.how == "at least" else ""
        return f"{prefix}{self.value:.2f}"


NO_CACHE = "-no-cache"           # a config or system name's suffix: the same without prefix caching


def without_cache(name: str) -> tuple[str, bool]:
    """'split-static-no-cache' -> ('split-static', False); 'split-static' -> ('split-static', True)."""
    return (name.removesuffix(NO_CACHE), False) if name.endswith(NO_CACHE) else (name, True)


def setups_for(configs: Sequence[str], chunk_sizes: Sequence[int]) -> list[Setup]:
    out: list[Setup] = []
    for name in configs:
        base, caching = without_cache(name)
        suffix = "" if caching else NO_CACHE
        if base == "colocated":
            out += [Setup(f"colocated-c{c}{suffix}", "colocated", chunk_size=c, prefix_caching=caching)
                    for c in chunk_sizes]
        elif base in ("split-static", "split-dynamic"):
            out.append(Setup(name, "split", policy="static" if base == "split-static" else "auto",
                             prefix_caching=caching))
        else:
            raise ValueError(f"config {name!r}: use colocated, split-static or split-dynamic, each "
                             f"optionally with {NO_CACHE} (prefix caching off)")
    return out


def max_rate(rates: Sequence[float], attainments: Sequence[float], target: float) -> MaxRate:
    """First crossing of `target`, linear in rate between the last passing and the first failing rate."""
    points = sorted(zip(rates, attainments))
    if not points:
        return MaxRate(None, "below")
    if points[0][1] < target:
        return MaxRate(points[0][0], "below")
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a1 < target:
            if a0 == target:
                return MaxRate(r0, "exact")
            return MaxRate(r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "interpolated")
    return MaxRate(points[-1][0], "at least")


def ratio_text(num: MaxRate, den: MaxRate) -> str:
    """num / den, with what censoring on either side allows to say."""
    if den.value is None or num.value is None or (num.how, den.how) in (("below", "below"), ("below", "at least")):
        return "n/a"
    r = num.value / den.value
    if num.how == "below":
        return f"< {r:.2f}x"
    if den.how == "below":                  # the baseline's true value is under the lowest rate
        return f"> {r:.2f}x"
    if num.how == "at least" and den.how == "at least":
        return "n/a (both at the top rate)"
    if num.how == "at least":
        return f">= {r:.2f}x"
    if den.how == "at least":
        return f"<= {r:.2f}x"
    return f"{r:.2f}x"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _admin(state: Any) -> Any:
    from duoserve.credentials import secret_of
    from duoserve.duoctl import AdminClient
    orch = next((p for p in state.processes if p.name == "orchestrator"), None)
    if orch is None:
        raise RuntimeError("the split stack runs no orchestrator")
    return AdminClient(f"127.0.0.1:{orch.port}", token=secret_of(state.secret_file))


def run_setup(setup: Setup, args: argparse.Namespace, specs: Workload, rates: Sequence[float],
              words: str, out_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Start the setup's stack, warm it, run every rate, stop it. Returns its part of the JSON."""
    from duoserve import stack
    from duoserve.stack import Mode, StackConfig
    from duoserve.v1 import admin_pb2 as admin_pb

    config = StackConfig(
        state_dir=args.state_dir.expanduser(), cache_dir=args.cache_dir.expanduser(),
        name=f"bench-{setup.name}"[:64], mode=Mode(setup.mode), model=args.model, dtype=args.dtype,
        num_kv_blocks=args.num_kv_blocks, chunk_size=setup.chunk_size, startup_timeout_s=args.startup_timeout,
        with_orchestrator=setup.mode == "split", prefix_caching=setup.prefix_caching)
    started = time.monotonic()
    say(f"{setup.name}: starting the stack")
    stack.up(config, detach=True, say=lambda m: say(f"{setup.name}: {m}"), out=io.StringIO())
    try:
        state = stack.read_state(config.state_path)
        if setup.policy is not None:
            admin = _admin(state)
            admin.call("SetSLO", admin_pb.SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms,
                                              percentile=args.attainment * 100, prefer="tpot"))
            mode = admin.call("SetPolicy", admin_pb.SetPolicyRequest(mode=setup.policy))
            say(f"{setup.name}: policy {mode.mode}, shares prefill {mode.shares.prefill:.2f} / "
                f"decode {mode.shares.decode:.2f}")
        def decisions(result: Any) -> dict[str, Any]:       # what the policy did during the run
            return {"decisions": _decisions_since(_admin(state), result.started_at)}
        runs = sweep(state.gateway_target, setup.name, args, specs, rates, words, out_dir, say,
                     decisions if setup.policy is not None else None)
    finally:
        stack.down(config.state_dir, config.name, stop_timeout_s=config.stop_timeout_s,
                   say=lambda m: say(f"{setup.name}: {m}"))
    return {"setup": asdict(setup), "runs": runs, "wall_s": time.monotonic() - started}


def sweep(target: str, name: str, args: argparse.Namespace, specs: Workload, rates: Sequence[float],
          words: str, out_dir: Path, say: Callable[[str], None],
          after_run: Callable[[Any], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """On a running server: warm it, then bench serve's run at each rate. One JSON entry per rate,
    also written to out_dir; `after_run(result)` may add fields to it."""
    warm = list(specs[:WARMUP_REQUESTS])
    run_benchmark(target, warm, arrival_from_args(args, math.inf), warmup=0, progress=False, run=0)
    say(f"{name}: warmed up with {len(warm)} {'conversations' if is_conversations(warm) else 'requests'}")
    runs: list[dict[str, Any]] = []
    for run, rate in enumerate(rates, start=1):      # each rate's prompts its own: none hits another's cache
        load_before = os.getloadavg()[0]
        result = run_benchmark(target, specs, arrival_from_args(args, rate), run=run,
                               max_concurrency=args.max_concurrency, slo_ttft_ms=args.slo_ttft_ms,
                               slo_tpot_ms=args.slo_tpot_ms, warmup=0, progress=not args.no_progress,
                               label=f"{name} @ {rate:g} req/s", workload=words)
        print(format_result(result), file=sys.stderr)
        # The machine's 1-min load average around the run: other processes on these cores skew every number.
        entry = {"rate": rate, "load_avg_1m": [load_before, os.getloadavg()[0]], "result": result.to_json()}
        if after_run is not None:
            entry |= after_run(result)
        runs.append(entry)
        (out_dir / f"{name}-rate{rate:g}.json").write_text(json.dumps(entry, indent=1))
    return runs


def _decisions_since(admin: Any, since_unix: float) -> list[dict[str, Any]]:
    """The orchestrator's share changes during a run (what the policy did)."""
    from google.protobuf import json_format

    from duoserve.v1 import admin_pb2 as admin_pb
    history = admin.call("GetHistory", admin_pb.GetHistoryRequest(limit=200))
    return [json_format.MessageToDict(d, preserving_proto_field_name=True)
            for d in history.decisions if d.time_unix >= since_unix and d.changed]


def summarize(results: dict[str, Any], rates: Sequence[float], target: float) -> dict[str, Any]:
    """Per setup: attainment and goodput per rate, the max rate, and the ratio to the best colocated."""
    summary: dict[str, Any] = {}
    for name, part in results.items():
        metrics = {run["rate"]: run["result"]["metrics"] for run in part["runs"]}
        loads = {run["rate"]: max(run["load_avg_1m"]) for run in part["runs"] if "load_avg_1m" in run}
        changes = {run["rate"]: len(run["decisions"]) for run in part["runs"] if "decisions" in run}
        att = [metrics[r]["slo_attainment"] for r in rates if r in metrics]
        best = max_rate([r for r in rates if r in metrics], att, target)
        summary[name] = {"max_rate": asdict(best), "max_rate_text": best.text(),
                         "per_rate": {str(r): {k: metrics[r][k] for k in
                                               ("slo_attainment", "request_goodput", "request_throughput",
                                                "completed", "failed")}
                                      | {"ttft_p50_ms": metrics[r]["ttft"]["median_ms"],
                                         "ttft_p90_ms": metrics[r]["ttft"]["percentiles_ms"].get("p90"),
                                         "tpot_p90_ms": metrics[r]["tpot"]["percentiles_ms"].get("p90"),
                                         "cached_share": cached_share(metrics[r]),
                                         "load_avg_1m": loads.get(r), "share_changes": changes.get(r)}
                                      for r in rates if r in metrics}}
    colocated = [n for n in summary if n.startswith("colocated")]
    if colocated:
        def key(n: str) -> float:
            v = summary[n]["max_rate"]
            return -math.inf if v["value"] is None or v["how"] == "below" else v["value"]
        base = max(colocated, key=key)
        for name, s in summary.items():
            s["vs"] = base
            s["ratio_text"] = ratio_text(MaxRate(**s["max_rate"]), MaxRate(**summary[base]["max_rate"]))
    return summary


def cached_share(metrics: dict[str, Any]) -> float | None:
    """A run's prompt tokens found in the server's prefix cache, as a share (None: the server did not say)."""
    cached, total = metrics.get("total_cached_tokens"), metrics.get("total_input_tokens")
    return None if cached is None or not total else cached / total


def format_table(summary: dict[str, Any], rates: Sequence[float], args: argparse.Namespace) -> str:
    w = max([16, *(len(n) for n in summary)])
    unit = "conv/s" if args.dataset == "multi-turn" else "req/s"
    lines = [f"SLO: TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms; "
             f"target: {args.attainment:.0%} of requests meet both",
             f"{'config':<{w}} {'rate':>6} {'attain':>7} {'goodput':>8} {'thruput':>8} {'TTFT p50':>9} "
             f"{'TTFT p90':>9} {'TPOT p90':>9} {'cached':>6} {'failed':>6} {'load':>5} {'moves':>5}"]
    for name, s in summary.items():
        for i, r in enumerate(rates):
            m = s["per_rate"].get(str(r))
            if m is None:
                continue
            lines.append(f"{name if i == 0 else '':<{w}} {r:>6g} {m['slo_attainment']:>7.0%} "
                         f"{m['request_goodput']:>8.2f} {m['request_throughput']:>8.2f} "
                         f"{_num(m.get('ttft_p50_ms'), '.0f'):>7}ms {m['ttft_p90_ms']:>7.0f}ms "
                         f"{m['tpot_p90_ms']:>7.0f}ms {_num(m.get('cached_share'), '.0%'):>6} {m['failed']:>6} "
                         f"{_num(m.get('load_avg_1m'), '.1f'):>5} {_num(m.get('share_changes'), 'd'):>5}")
    base = next((s["vs"] for s in summary.values() if "vs" in s), None)
    lines += ["", f"{'config':<{w}} {'max rate @ ' + format(args.attainment, '.0%'):>17}  "
              + (f"vs {base}" if base else "")]
    for name, s in summary.items():
        lines.append(f"{name:<{w}} {s['max_rate_text'] + ' ' + unit:>17}  {s.get('ratio_text', '')}")
    lines.append("thruput: completed requests / s; cached: prompt tokens found in the prefix cache; load: the "
                 "machine's highest 1-min load average around the run (2 cores: above 2, other processes "
                 "competed); moves: share changes the orchestrator made during the run")
    if unit == "conv/s":
        lines.append("rate: conversations started per second; each sends its turns one after another (multi-turn)")
    lines.append("max rate: first crossing of the target, linear in rate between the last rate that meets it "
                 "and the next that does not; >= : every rate met it; < : the lowest rate missed it")
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_from_args(args: argparse.Namespace) -> int:
    rates = sorted({float(x) for x in args.rates.split(",") if x.strip()})
    chunk_sizes = [int(x) for x in args.chunk_sizes.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError("--rates: give positive request rates, e.g. 0.5,1,2")
    if not 0 < args.attainment <= 1:
        raise ValueError("--attainment must be in (0, 1]")
    setups = setups_for([c.strip() for c in args.configs.split(",") if c.strip()], chunk_sizes)
    if not args.no_plots:
        from bench.plots import require_matplotlib
        require_matplotlib()                 # fail before an hour of runs, not after
    specs, words = workload_from_args(args)
    out_dir = args.output
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"compare: {message}", file=sys.stderr, flush=True)

    say(f"{len(setups)} configurations x {len(rates)} rates, {words}")
    started, load_before = time.monotonic(), os.getloadavg()[0]
    from duoserve.stack import StackError
    try:
        results = {s.name: run_setup(s, args, specs, rates, words, out_dir, say) for s in setups}
    except StackError as e:
        say(f"error: {e}")
        return 1
    summary = summarize(results, rates, args.attainment)
    report = {"workload": words, "rates": rates, "attainment_target": args.attainment,
              "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
              "arrival": asdict(arrival_from_args(args, rates[0])) | {"rate": "swept"},
              "wall_s": time.monotonic() - started, "load_avg_1m_before": load_before,
              "threading_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))},
              "summary": summary, "results": results}
    (out_dir / "compare.json").write_text(json.dumps(report, indent=1))
    print(format_table(summary, rates, args))
    if not args.no_plots:
        from bench.plots import plot_comparison
        for path in plot_comparison(report, out_dir):
            say(f"wrote {path}")
    say(f"wrote {out_dir / 'compare.json'}; {time.monotonic() - started:.0f} s in all")
    return 0

