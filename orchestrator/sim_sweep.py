"""`duoserve simulate`: colocated chunked prefill, static splits and the dynamic policy over one trace,
swept over the request rate, with the highest rate at which `attainment` (90%) of the requests meet
both SLOs and the ratios between the systems.

The rate search: every system runs at every rate of the grid (multiples of the trace's own rate);
then, per system, bisection between its highest passing rate below its first failing rate (0 when
none passes) and that failing rate, `bisect_steps` halvings. The max rate is the highest rate that
was simulated and passed: never interpolated. A system that passes the whole grid is reported "at
least" the top of the grid. Runs are independent and spread over `jobs` processes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from orchestrator.coresidency import CoResidency, for_device
from orchestrator.hold import HoldConfig
from orchestrator.policy import SLO, Shares
from orchestrator.sim_calibration import Calibration, StackProfile, calibrate, vidur_check
from orchestrator.sim_conversations import ConversationWorkload, max_prompt_tokens
from orchestrator.sim_trace import TraceRequest, base_rate, describe, load_trace, poisson
from orchestrator.simulator import SimOptions, System, simulate
from services.common.progress import progress

VIDUR_CSV = "vidur_h100_llama2_7b_mlp.csv"
REPO_DATA = Path(__file__).resolve().parents[1] / "bench" / "data"     # where the vidur file is, beside the traces
Workload = list[TraceRequest] | ConversationWorkload     # a trace, or conversations (--multi-turn)


def rate_of(workload: Workload) -> float:
    """Requests per second at rate multiple 1."""
    return workload.base_rate() if isinstance(workload, ConversationWorkload) else base_rate(workload)


def default_systems(profile: StackProfile, chunks: Sequence[int] | None = None,
                    splits: Sequence[tuple[float, float]] | None = None) -> list[System]:
    """Colocated at each chunk, a static split at each (prefill, decode) share, and the dynamic policy."""
    systems = [System(f"colocated-c{c}", "colocated", chunk_size=c) for c in (chunks or profile.colocated_chunks)]
    for p, d in splits or profile.static_splits:
        systems.append(System(f"split-static-{round(p * 100)}/{round(d * 100)}", "split",
                              shares=Shares(p, d, profile.initial_budget)))
    p, d = profile.initial_split
    systems.append(System("split-dynamic", "split", shares=Shares(p, d, profile.initial_budget), dynamic=True))
    return systems


# ---------------------------------------------------------------------- running many
_WORKER: dict[str, Any] = {}


def _init_worker(calibration: Calibration, options: SimOptions, trace: Workload, rate: float) -> None:
    _WORKER.update(cal=calibration, options=options, trace=trace, rate=rate)


def _run_one(task: tuple[System, float]) -> dict[str, Any]:
    system, multiple = task
    w = _WORKER
    return simulate(system, w["cal"], w["options"], w["trace"], multiple, w["rate"]).as_dict()


class _Runner:
    """Runs (system, rate) tasks in this process (jobs 1) or a pool of processes."""

    def __init__(self, calibration: Calibration, options: SimOptions, trace: Workload, jobs: int):
        args = (calibration, options, trace, rate_of(trace))
        self.pool = None
        if jobs > 1:
            self.pool = ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=args)
        else:
            _init_worker(*args)

    def map(self, tasks: list[tuple[System, float]], desc: str) -> list[dict[str, Any]]:
        """Each task's result, in order; a progress bar of finished runs on a terminal."""
        results = map(_run_one, tasks) if self.pool is None else self.pool.map(_run_one, tasks)
        return list(progress(results, total=len(tasks), desc=desc, unit="run"))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _passes(run: dict[str, Any], target: float) -> bool:
    return not run["early_stopped"] and run["attainment"] >= target


def compare(calibration: Calibration, options: SimOptions, trace: Workload, systems: Sequence[System],
            rates: Sequence[float], bisect_steps: int = 3, jobs: int = 1,
            say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every system at every rate, then the bisection; returns the report (see docs/simulator.md)."""
    started = time.perf_counter()
    rates = sorted(set(rates))
    runs: dict[str, dict[float, dict[str, Any]]] = {s.name: {} for s in systems}
    runner = _Runner(calibration, options, trace, jobs)
    try:
        tasks = [(s, r) for r in rates for s in systems]
        say(f"{len(tasks)} runs on the rate grid ({len(systems)} systems x {len(rates)} rates, {jobs} processes)")
        for (s, r), run in zip(tasks, runner.map(tasks, "rate grid")):
            runs[s.name][r] = run
        brackets = {}
        for s in systems:
            failing = [r for r in rates if not _passes(runs[s.name][r], options.attainment)]
            if failing:
                hi = failing[0]
                lo = max((r for r in rates if r < hi), default=0.0)
                brackets[s.name] = [lo, hi]
        for step in range(bisect_steps if len(rates) > 0 else 0):
            tasks = [(s, round((brackets[s.name][0] + brackets[s.name][1]) / 2, 4)) for s in systems
                     if s.name in brackets]
            if not tasks:
                break
            say(f"bisection step {step + 1}/{bisect_steps}: {len(tasks)} runs")
            for (s, r), run in zip(tasks, runner.map(tasks, f"bisection {step + 1}/{bisect_steps}")):
                runs[s.name][r] = run
                brackets[s.name][0 if _passes(run, options.attainment) else 1] = r
    finally:
        runner.close()
    base = rate_of(trace)
    out_systems = []
    for s in systems:
        by_rate = runs[s.name]
        if s.name not in brackets:
            best, bound = max(rates), "at_least"
        else:
            best = brackets[s.name][0]
            bound = "exact" if best > 0 else "below_grid"
        best = best if best > 0 else None
        out_systems.append({
            "name": s.name, "layout": s.layout, "chunk_size": s.chunk_size or None,
            "shares": asdict(s.shares) if s.shares else None, "dynamic": s.dynamic,
            "max_rate_multiple": best, "max_rate_per_s": round(best * base, 3) if best else None,
            "max_rate_bound": bound, "first_failing_multiple": brackets.get(s.name, [None, None])[1],
            "runs": [by_rate[r] for r in sorted(by_rate)]})
    ratios = _ratios(out_systems)
    return {"systems": out_systems, "ratios": ratios, "summary": _summary(out_systems, ratios["best_colocated"]),
            "rates": rates, "rates_per_s": [round(r * base, 4) for r in rates],
            "rate_search": f"grid, then {bisect_steps} bisection steps per system between its highest passing "
                           "and first failing rate; max rate = the highest simulated rate that passed",
            "wall_s": round(time.perf_counter() - started, 1)}


def _ratios(systems: list[dict[str, Any]]) -> dict[str, Any]:
    def best(kind: str) -> dict[str, Any] | None:
        group = [s for s in systems if s["layout"] == kind and not s["dynamic"]] if kind != "dynamic" else \
            [s for s in systems if s["dynamic"]]
        group = [s for s in group if s["max_rate_multiple"]]
        return max(group, key=lambda s: s["max_rate_multiple"], default=None)
    colocated, static, dynamic = best("colocated"), best("split"), best("dynamic")
    def ratio(a, b) -> float | None:
        return round(a["max_rate_multiple"] / b["max_rate_multiple"], 3) if a and b else None
    return {"best_colocated": colocated and colocated["name"], "best_static": static and static["name"],
            "dynamic_vs_best_colocated": ratio(dynamic, colocated),
            "best_static_vs_best_colocated": ratio(static, colocated), "dynamic_vs_best_static": ratio(dynamic, static)}


_HOW = {"exact": "exact", "at_least": "at least", "below_grid": "below"}


def _summary(systems: list[dict[str, Any]], best_colocated: str | None) -> dict[str, Any]:
    """The same per-configuration summary as `duoserve bench compare` writes (rates in req/s)."""
    out: dict[str, Any] = {}
    for s in systems:
        how = _HOW[s["max_rate_bound"]]
        value = s["max_rate_per_s"] if how != "below" else min(r["rate_per_s"] for r in s["runs"])
        text = f"{'>= ' if how == 'at least' else '< ' if how == 'below' else ''}{value:.2f}"
        out[s["name"]] = {"max_rate": {"value": value, "how": how}, "max_rate_text": text, "per_rate": {
            str(r["rate_per_s"]): {"slo_attainment": r["attainment"], "request_goodput": r["goodput_per_s"],
                                   "request_throughput": r["throughput_per_s"], "completed": r["finished"],
                                   "failed": r["rejected"], "ttft_p90_ms": r["ttft_ms"].get("p90"),
                                   "tpot_p90_ms": r["tpot_ms"].get("p90"), "load_avg_1m": None,
                                   "share_changes": r["share_changes"], "early_stopped": r["early_stopped"]}
            for r in s["runs"]}}
    if best_colocated is not None:
        base = out[best_colocated]["max_rate"]
        for s in out.values():
            s["vs"] = best_colocated
            s["ratio_text"] = _ratio_text(s["max_rate"], base)
    return out


def _ratio_text(num: dict[str, Any], den: dict[str, Any]) -> str:
    if den["how"] == "below" or not den["value"] or num["value"] is None:
        return "n/a"
    r = num["value"] / den["value"]
    if num["how"] == "below":
        return f"< {r:.2f}x"
    if num["how"] == "at least" and den["how"] == "at least":
        return "n/a (both at the top rate)"
    return f"{'>= ' if num['how'] == 'at least' else '<= ' if den['how'] == 'at least' else ''}{r:.2f}x"


# ---------------------------------------------------------------------- the table
def format_table(report: dict[str, Any]) -> str:
    slo = report["slo"]
    tr = report["trace"]
    what = (f"trace {tr['path']}" if "path" in tr else
            f"{tr['conversations']} conversations of {tr['turns']} turns (user {tr['user_tokens']}, answer "
            f"{tr['answer_tokens']}, system {tr['system_tokens']} tokens, think {tr['think_s']:g} s)")
    cache = "prefix caching on" if report["options"].get("prefix_caching") else "no prefix caching"
    head = (f"{report['calibration']['model']} on {report['calibration']['gpu']}: {what} "
            f"({tr['requests']} requests, {tr['rate_per_s']:.2f} req/s at 1x; {cache}); "
            f"SLO TTFT {slo['ttft_ms']:g} ms, TPOT {slo['tpot_ms']:g} ms, both met by >= "
            f"{report['attainment_target']:.0%} of requests")
    rates = report["rates"]
    target = report["attainment_target"]
    lines = [head, "", f"attainment (both SLOs) by rate multiple; <{target:.2f}: stopped early, once more than "
                       f"{1 - target:.0%} of the requests had missed", ""]
    name_w = max(len(s["name"]) for s in report["systems"]) + 2
    lines.append("system".ljust(name_w) + "".join(f"{r:>7g}x" for r in rates) +
                 "   max rate    req/s   vs best colocated   p90 TTFT / TPOT at max (ms)")
    best_colo = next((s for s in report["systems"] if s["name"] == report["ratios"]["best_colocated"]), None)
    for s in report["systems"]:
        by_rate = {run["rate_multiple"]: run for run in s["runs"]}
        cells = []
        for r in rates:
            run = by_rate.get(r)
            text = f"<{target:.2f}" if run and run["early_stopped"] else f"{run['attainment']:.2f}" if run else ""
            cells.append(text.rjust(8))
        best = s["max_rate_multiple"]
        mark = {"at_least": ">=", "below_grid": "<", "exact": ""}[s["max_rate_bound"]]
        rate_txt = f"{mark}{best:g}x" if best else f"<{min(rates):g}x"
        per_s = f"{s['max_rate_per_s']:.2f}" if best else "-"
        vs = f"{best / best_colo['max_rate_multiple']:.2f}" if best and best_colo else "-"
        at = by_rate.get(best) if best else None
        lat = (f"{at['ttft_ms'].get('p90', float('nan')):.0f} / {at['tpot_ms'].get('p90', float('nan')):.1f}"
               if at else "-")
        if at and at.get("prefix_hit_rate") is not None:
            lat += f"   (cache hits {at['prefix_hit_rate']:.0%})"
        lines.append(s["name"].ljust(name_w) + "".join(cells) + f"{rate_txt:>11}{per_s:>9}{vs:>20}   {lat}")
    r = report["ratios"]
    lines.append("")
    if r["dynamic_vs_best_colocated"] is not None:
        lines.append(f"dynamic / best colocated ({r['best_colocated']}): {r['dynamic_vs_best_colocated']:.3f}x; "
                     f"best static ({r['best_static']}) / best colocated: {r['best_static_vs_best_colocated']}; "
                     f"dynamic / best static: {r['dynamic_vs_best_static']}")
    lines.append(f"{sum(len(s['runs']) for s in report['systems'])} runs in {report['wall_s']:.0f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _splits(text: str) -> list[tuple[float, float]]:
    out = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        p, _, d = part.partition("/")
        p_, d_ = float(p), float(d)
        out.append((p_ / 100, d_ / 100) if p_ > 1 or d_ > 1 else (p_, d_))
    return out


def build_report(args: Any, say: Callable[[str], None]) -> dict[str, Any]:
    cal = calibrate(args.gpu, args.model, cpu_cores=args.cpu_cores, coefficients_path=args.calibration,
                    num_kv_blocks=args.num_kv_blocks)
    trace, described = _workload(args, cal.profile)
    profile = cal.profile
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, percentile=args.attainment, prefer=args.prefer or profile.prefer)
    # One rate (--rate-scale) is for looking at latencies (the CPU validation): every request is simulated.
    coresidency = for_device(cal.device.kind, args.coresidency_calibration)
    if args.no_coresidency:
        coresidency = CoResidency(enabled=False, residual=0.0, source="off (--no-coresidency): time-shared")
    hold = None
    if args.min_dwell_ms is not None or args.persist_ticks is not None:
        hold = HoldConfig(persist_ticks=3 if args.persist_ticks is None else args.persist_ticks,
                          min_dwell_ms=profile.min_dwell_ms if args.min_dwell_ms is None else args.min_dwell_ms)
    options = SimOptions(slo, attainment=args.attainment, early_stop=not (args.no_early_stop or args.rate_scale),
                         bw_contention=not args.no_bw_contention, tick_ms=args.tick_ms,
                         switch_cost_ms=args.switch_cost_ms, overlap=args.overlap, coresidency=coresidency, hold=hold,
                         prefix_caching=args.prefix_caching, policy_sees_cache=not args.policy_blind_to_cache)
    systems = default_systems(profile, [int(c) for c in _floats(args.chunks)] if args.chunks else None,
                              _splits(args.static_splits) if args.static_splits else None)
    if args.systems:
        wanted = [x.strip() for x in args.systems.split(",") if x.strip()]
        unknown = set(wanted) - {s.name for s in systems}
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(s.name for s in systems)}")
        systems = [s for s in systems if s.name in wanted]
    rates = [args.rate_scale] if args.rate_scale else _floats(args.rates)
    if not rates or min(rates) <= 0:
        raise ValueError("--rates: give positive rate multiples, e.g. 1,2,4")
    vidur = args.vidur or (Path(args.trace).parent if args.trace else REPO_DATA) / VIDUR_CSV
    check = vidur_check(vidur, cal.build_model()) if cal.gpu != "cpu" and Path(vidur).is_file() else None
    say(f"{cal.model_name} on {cal.gpu}: {described['requests']} requests, {rate_of(trace):.2f} req/s at 1x; "
        f"{len(systems)} systems" + (f"; vidur check: median error {check['median_rel_error']:.1%}" if check else ""))
    report = compare(cal, options, trace, systems, rates, 0 if args.rate_scale else args.bisect_steps,
                     max(1, args.jobs), say)
    report.update(
        command="duoserve simulate " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["simulate"] else sys.argv[1:]),
        trace=described,
        calibration=cal.describe(), vidur_check=check, attainment_target=args.attainment,
        slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms,
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "prefer": slo.prefer, "margin": slo.margin},
        options={"tick_ms": options.tick_ms or profile.tick_ms,
                 "switch_cost_ms": profile.switch_cost_ms if options.switch_cost_ms is None else options.switch_cost_ms,
                 "overlap": profile.overlap if options.overlap is None else options.overlap,
                 "bw_contention": options.bw_contention, "early_stop": options.early_stop,
                 "prefix_caching": options.prefix_caching, "policy_sees_cache": options.policy_sees_cache,
                 "coresidency": {"enabled": coresidency.enabled, "residual": coresidency.residual,
                                 "source": coresidency.source},
                 "hold": asdict(hold or HoldConfig(min_dwell_ms=profile.min_dwell_ms)),
                 "max_num_seqs": profile.max_num_seqs, "max_model_len": profile.max_model_len,
                 "split_max_batched_tokens": profile.split_max_batched_tokens})
    return report


def _workload(args: Any, profile: StackProfile) -> tuple[Workload, dict[str, Any]]:
    """The trace of --trace, or the conversations of --multi-turn; and how the report describes it."""
    if args.multi_turn:
        workload = ConversationWorkload(args.conversations, args.turns, args.user_tokens, args.answer_tokens,
                                        args.think_s, args.conversation_rate, args.system_tokens, args.seed)
        if max_prompt_tokens(workload) >= profile.max_model_len:
            raise ValueError(f"--multi-turn: the last turn needs {max_prompt_tokens(workload)} tokens of context, "
                             f"the profile's max_model_len is {profile.max_model_len}: fewer turns or tokens")
        return workload, workload.describe()
    if args.trace is None:
        raise ValueError("give --trace FILE, or --multi-turn for the conversation workload")
    trace = load_trace(args.trace, max_requests=args.max_requests, start_s=args.start_s, duration_s=args.duration_s,
                       length_scale=args.length_scale, max_total_len=args.max_total_len)
    if args.arrivals == "poisson":
        trace = poisson(trace, args.seed)
    return trace, {"path": str(args.trace), "arrivals": args.arrivals, "seed": args.seed,
                   "length_scale": args.length_scale, **describe(trace)}


def run_from_args(args: Any) -> int:
    def say(message: str) -> None:
        print(f"duoserve simulate: {message}", file=sys.stderr, flush=True)
    report = build_report(args, say)
    print(format_table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
        say(f"wrote {args.output}")
    return 0


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
