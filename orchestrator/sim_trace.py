"""Request traces for the simulator: arrival times, prompt and output lengths.

Pure Python. The format is Azure's LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`, as
in bench/data/azure_conv_2023.csv); TIMESTAMP may also be plain seconds. Arrivals are kept as
recorded (bursts included) and compressed or stretched by a rate multiple; `poisson` instead draws
exponential gaps at the same mean rate from a seed, keeping the lengths in trace order.
"""
from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace."""

    arrival_s: float       # seconds after the trace's first request (before rate scaling)
    prompt_tokens: int     # ContextTokens
    output_tokens: int     # GeneratedTokens, at least 1: the request ends after exactly this many


_EPOCH = datetime(1970, 1, 1)    # naive: no time zone or DST in the arithmetic


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        # "2023-11-16 18:15:46.6805900": seven fractional digits; fromisoformat takes six.
        head, _, frac = text.strip().partition(".")
        return (datetime.fromisoformat(head) - _EPOCH).total_seconds() + (float("0." + frac) if frac else 0.0)


def load_trace(path: str | Path, *, max_requests: int | None = None, start_s: float = 0.0,
               duration_s: float | None = None, length_scale: float = 1.0,
               max_total_len: int | None = None) -> list[TraceRequest]:
    """Requests of an Azure-format CSV, in arrival order, from `start_s` for `duration_s` seconds (and at
    most `max_requests`), re-based so the first kept request arrives at 0.

    As `bench.datasets.load_azure_conv` (so a simulation and a `bench serve` run see the same requests):
    lengths are multiplied by `length_scale` and rounded, at least 1 each; with `max_total_len` the
    output is kept below it and the prompt cut so that both fit."""
    if length_scale <= 0:
        raise ValueError("length scale must be positive")
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace (missing columns {', '.join(sorted(missing))})")
        for row in reader:
            rows.append((_seconds(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0] + start_s
    out: list[TraceRequest] = []
    for t, prompt, output in rows:
        rel = t - t0
        if rel < 0:
            continue
        if duration_s is not None and rel >= duration_s:
            break
        if max_requests is not None and len(out) >= max_requests:
            break
        output = max(1, round(output * length_scale))
        prompt = max(1, round(prompt * length_scale))
        if max_total_len is not None:
            output = min(output, max_total_len - 1)
            prompt = min(prompt, max_total_len - output)
        out.append(TraceRequest(rel, prompt, output))
    if not out:
        raise ValueError(f"{path}: no requests in the chosen window")
    first = out[0].arrival_s
    return [TraceRequest(r.arrival_s - first, r.prompt_tokens, r.output_tokens) for r in out]


def base_rate(trace: Sequence[TraceRequest]) -> float:
    """Requests per second of the trace as recorded (rate multiple 1)."""
    span = trace[-1].arrival_s - trace[0].arrival_s
    return (len(trace) - 1) / span if span > 0 else float(len(trace))


def poisson(trace: Sequence[TraceRequest], seed: int) -> list[TraceRequest]:
    """The same lengths in the same order, arriving as a Poisson process at the trace's mean rate."""
    rng = random.Random(seed)
    rate = base_rate(trace)
    t, out = 0.0, []
    for r in trace:
        out.append(TraceRequest(t, r.prompt_tokens, r.output_tokens))
        t += rng.expovariate(rate)
    return out


def arrivals_ms(trace: Sequence[TraceRequest], rate_multiple: float) -> list[float]:
    """Arrival times in ms with the rate multiplied by `rate_multiple` (gaps divided by it)."""
    if rate_multiple <= 0:
        raise ValueError("rate multiple must be positive")
    scale = 1000.0 / rate_multiple
    return [r.arrival_s * scale for r in trace]


def describe(trace: Sequence[TraceRequest]) -> dict[str, float]:
    """Size, duration, rate and mean lengths: for the report."""
    n = len(trace)
    return {"requests": n, "duration_s": round(trace[-1].arrival_s, 3), "rate_per_s": round(base_rate(trace), 4),
            "mean_prompt_tokens": round(sum(r.prompt_tokens for r in trace) / n, 1),
            "mean_output_tokens": round(sum(r.output_tokens for r in trace) / n, 1)}


def synthetic(num_requests: int, mean_prompt: float, mean_output: float, rate_per_s: float, seed: int, *,
              prompt_sigma: float = 0.8, output_sigma: float = 0.6, max_prompt: int = 14000,
              max_output: int = 512) -> list[TraceRequest]:
    """A seeded synthetic trace: Poisson arrivals at `rate_per_s`, log-normal prompt and output lengths with
    these means (before clipping to [1, max]). Used for workloads no recorded trace here has, such as the
    prefill-heavy one of docs/simulator.md (mean prompt 2000, output 30)."""
    if num_requests < 1 or mean_prompt < 1 or mean_output < 1 or rate_per_s <= 0:
        raise ValueError("num_requests, mean_prompt and mean_output must be at least 1, rate_per_s positive")
    rng = random.Random(seed)
    mu_p = math.log(mean_prompt) - prompt_sigma ** 2 / 2
    mu_o = math.log(mean_output) - output_sigma ** 2 / 2
    t, out = 0.0, []
    for _ in range(num_requests):
        prompt = min(max_prompt, max(1, round(rng.lognormvariate(mu_p, prompt_sigma))))
        output = min(max_output, max(1, round(rng.lognormvariate(mu_o, output_sigma))))
        out.append(TraceRequest(round(t, 6), prompt, output))
        t += rng.expovariate(rate_per_s)
    return out


def write_trace(path: str | Path, trace: Sequence[TraceRequest]) -> None:
    """The trace as an Azure-format CSV (TIMESTAMP in plain seconds), readable by `load_trace`."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        for r in trace:
            w.writerow([f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens])
