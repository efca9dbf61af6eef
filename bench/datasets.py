"""Workloads for `duoserve bench serve` / `compare`: what each request sends and when it arrives.

A request's life here:
  loaded       a dataset yields RequestSpecs: prompt length (or text), output length, and, for a
               trace, the arrival offset it was recorded at
  scheduled    an Arrival (trace / poisson / gamma) turns the specs into send offsets (`schedule`)
  given text   specs without text get token ids cut from real English text, tokenized by the
               served model's own tokenizer (`with_token_ids`), so every id is in its vocabulary

Outputs are forced to their length with ignore_eos=True, max_tokens=N, so every configuration of a
comparison does the same work. Pure: no I/O except reading the dataset files; no grpc, no torch.

Datasets:
  azure-conv   bench/data/azure_conv_2023.csv (Azure LLM inference trace, conversation, 2023-11-16;
               CC-BY 4.0): real arrival times (TIMESTAMP) and lengths (ContextTokens, GeneratedTokens),
               lengths scaled by `length_scale` (the trace's mean is 1155 prompt / 211 output tokens)
  random       lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)] (vLLM's `random`)
  prompt-file  one text prompt per line, `output_len` tokens each
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_AZURE_CONV = Path(__file__).resolve().parent / "data" / "azure_conv_2023.csv"   # bench/data/README.md
DEFAULT_LENGTH_SCALE = 0.1     # azure-conv: mean 116 prompt / 21 output tokens; 20 requests take ~20 s here

# The opening of Charles Dickens, "A Tale of Two Cities" (1859; public domain, Project Gutenberg #98).
# Real English, so prompts tokenize like real prompts; repeated and cut to the lengths asked for.
REAL_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way--in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only. There were a king with a large jaw and a queen with a plain face, on the throne of "
    "England; there were a king with a large jaw and a queen with a fair face, on the throne of France. In "
    "both countries it was clearer than crystal to the lords of the State preserves of loaves and fishes, "
    "that things in general were settled for ever. It was the year of Our Lord one thousand seven hundred "
    "and seventy-five. Spiritual revelations were conceded to England at that favoured period, as at this. "
    "Mrs. Southcott had recently attained her five-and-twentieth blessed birthday, of whom a prophetic "
    "private in the Life Guards had heralded the sublime appearance by announcing that arrangements were "
    "made for the swallowing up of London and Westminster. "
)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload."""

    prompt_len: int                          # prompt tokens (for a text prompt: as the served model tokenizes it)
    output_len: int                          # tokens to generate, forced: ignore_eos=True, max_tokens=output_len
    arrival_s: float | None = None           # trace: seconds after the trace's first request; else None
    prompt: str | None = None                # a text prompt (prompt file); None: token ids
    token_ids: tuple[int, ...] | None = None # the prompt as token ids (set by with_token_ids)
    from_corpus: bool = False                # token_ids cut from the corpus by with_token_ids: for_run renames them

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"prompt_len and output_len must be at least 1, got {self.prompt_len}, {self.output_len}")


@dataclass(frozen=True, slots=True)
class Arrival:
    """When requests are sent. vLLM's process: the first at 0, then gamma(shape=b, scale=1/(rate*b)) gaps."""

    kind: str = "poisson"        # "trace" (the recorded offsets), "poisson", or "gamma" (burstiness b)
    rate: float | None = None    # requests/s; inf: all at once. trace: rescale to this mean rate (None: as recorded)
    burstiness: float = 1.0      # gamma shape: < 1 burstier than Poisson, > 1 more regular; poisson is 1
    seed: int = 0                # the gaps' random generator
    per: str = "request"         # what arrives at `rate`: "request", or "conversation" (multi-turn: its first turn)

    def __post_init__(self) -> None:
        if self.kind not in ("trace", "poisson", "gamma"):
            raise ValueError(f"arrival {self.kind!r}: use trace, poisson or gamma")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"request rate must be positive (or inf), got {self.rate}")
        if self.kind != "trace" and self.rate is None:
            raise ValueError(f"arrival {self.kind} needs a request rate")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")
        if self.per not in ("request", "conversation"):
            raise ValueError(f"arrivals per {self.per!r}: use request or conversation")

    @property
    def unit(self) -> str:
        return "req/s" if self.per == "request" else "conversations/s"

    def describe(self) -> str:
        if self.kind == "trace":
            return "trace arrivals" + (f" rescaled to {self.rate:g} {self.unit}" if self.rate else " as recorded")
        shape = "Poisson" if self.kind == "poisson" else f"gamma, burstiness {self.burstiness:g}"
        return f"{self.rate:g} {self.unit} ({shape}, seed {self.seed})"


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------

def _parse_timestamp(text: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> seconds since the epoch (7 fractional digits: more than
    datetime parses, so the fraction is read separately)."""
    whole, _, frac = text.strip().partition(".")
    return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + (float(f"0.{frac}") if frac else 0.0)


def load_azure_conv(path: Path = DEFAULT_AZURE_CONV, *, max_requests: int | None = None,
                    start_offset_s: float = 0.0, length_scale: float = DEFAULT_LENGTH_SCALE,
                    rate_scale: float = 1.0, max_total_len: int | None = None) -> list[RequestSpec]:
    """Rows of the Azure conversation trace from `start_offset_s` seconds into it, at most `max_requests`.

    Arrival offsets are seconds after the first row taken, divided by `rate_scale` (2: twice the
    rate). Lengths are multiplied by `length_scale` and rounded, at least 1 token each; with
    `max_total_len` the prompt is cut so prompt + output fit (the output keeps its length).
    """
    if length_scale <= 0 or rate_scale <= 0:
        raise ValueError("length scale and rate scale must be positive")
    if start_offset_s < 0:
        raise ValueError("start offset must not be negative")
    if not path.exists():
        raise ValueError(f"{path}: no such file (the Azure conversation trace; see bench/data/README.md)")
    specs: list[RequestSpec] = []
    t0: float | None = None
    first: float | None = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = _parse_timestamp(row["TIMESTAMP"])
            t0 = t if t0 is None else t0
            if t - t0 < start_offset_s:
                continue
            first = t if first is None else first
            output_len = max(1, round(int(row["GeneratedTokens"]) * length_scale))
            prompt_len = max(1, round(int(row["ContextTokens"]) * length_scale))
            if max_total_len is not None:
                output_len = min(output_len, max_total_len - 1)
                prompt_len = min(prompt_len, max_total_len - output_len)
            specs.append(RequestSpec(prompt_len, output_len, arrival_s=(t - first) / rate_scale))
            if max_requests is not None and len(specs) >= max_requests:
                break
    if not specs:
        raise ValueError(f"{path}: no requests at or after {start_offset_s:g} s into the trace")
    return specs


def random_requests(num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[RequestSpec]:
    """vLLM's `random` dataset: each length uniform over the integers in [len*(1-r), len*(1+r)]."""
    if num_requests < 1:
        raise ValueError("the number of requests must be at least 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("input and output lengths must be at least 1")
    rng = np.random.default_rng(seed)
    ins = rng.integers(max(1, int(input_len * (1 - range_ratio))), int(input_len * (1 + range_ratio)) + 1,
                       size=num_requests)
    outs = rng.integers(max(1, int(output_len * (1 - range_ratio))), int(output_len * (1 + range_ratio)) + 1,
                        size=num_requests)
    return [RequestSpec(int(i), int(o)) for i, o in zip(ins, outs)]


def load_prompt_file(path: Path, output_len: int, *, max_requests: int | None = None) -> list[RequestSpec]:
    """One prompt per line (blank lines skipped); prompt_len is a placeholder until tokenized."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except OSError as e:
        raise ValueError(f"prompt file {path}: {e.strerror}") from None
    prompts = [line for line in lines if line][:max_requests]
    if not prompts:
        raise ValueError(f"prompt file {path}: no prompts (one per line)")
    return [RequestSpec(max(1, len(p) // 4), output_len, prompt=p) for p in prompts]


# ---------------------------------------------------------------------------------------------
# Prompts and arrivals
# ---------------------------------------------------------------------------------------------

RUN_TOKEN_BASE = 1000       # run k's prompts start with token RUN_TOKEN_BASE + k (an id every Llama vocabulary has)


def for_run(specs: Sequence[RequestSpec], run: int) -> list[RequestSpec]:
    """The specs with the first token of every prompt cut from the corpus set to one of run `run`
    only, lengths kept: prefix caching (duoserve's, vLLM's) keys a block by everything before it, so
    no run reuses the KV of another run's prompts (a sweep sends the same workload at each rate; a
    warm-up before it). Within a run the prompts already differ from their first block on
    (`with_token_ids`); text prompts and token ids given as such are left as they are."""
    token = RUN_TOKEN_BASE + run
    return [replace(s, token_ids=(token, *s.token_ids[1:])) if s.from_corpus and s.token_ids else s
            for s in specs]


def with_token_ids(specs: Sequence[RequestSpec], corpus_ids: Sequence[int]) -> list[RequestSpec]:
    """Give each spec without a prompt `prompt_len` token ids: a window of the repeated corpus,
    starting at a different place per request (so prompts differ), wrapping around."""
    if not corpus_ids:
        raise ValueError("the corpus tokenized to no tokens")
    n = len(corpus_ids)
    out = []
    for i, spec in enumerate(specs):
        if spec.prompt is not None or spec.token_ids is not None:
            out.append(spec)
            continue
        start = (i * 7919) % n                      # a prime stride: starts spread over the corpus
        ids = tuple(corpus_ids[(start + k) % n] for k in range(spec.prompt_len))
        out.append(replace(spec, token_ids=ids, from_corpus=True))
    return out


def trace_rate(specs: Sequence[RequestSpec]) -> float:
    """The recorded mean rate: (n - 1) gaps over the span from the first to the last arrival."""
    times = [s.arrival_s for s in specs]
    if any(t is None for t in times):
        raise ValueError("trace arrivals need a dataset with arrival times (azure-conv)")
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else math.inf


def schedule(specs: Sequence[RequestSpec], arrival: Arrival) -> list[float]:
    """Send offsets in seconds from the start of the run, one per spec, in spec order (non-decreasing)."""
    n = len(specs)
    if arrival.kind == "trace":
        rate = trace_rate(specs)
        times = [s.arrival_s - specs[0].arrival_s for s in specs]
        if arrival.rate is None:
            return times
        if math.isinf(arrival.rate):
            return [0.0] * n
        factor = rate / arrival.rate if math.isfinite(rate) else 1.0
        return [t * factor for t in times]
    return process_offsets(n, arrival)


def process_offsets(n: int, arrival: Arrival) -> list[float]:
    """`n` send offsets of a Poisson or gamma process (the first at 0), or all at 0 at rate inf."""
    if arrival.kind == "trace":
        raise ValueError("trace arrivals need a dataset with arrival times (azure-conv)")
    if math.isinf(arrival.rate):
        return [0.0] * n
    rng = np.random.default_rng(arrival.seed)
    shape = 1.0 if arrival.kind == "poisson" else arrival.burstiness
    gaps = rng.gamma(shape=shape, scale=1.0 / (arrival.rate * shape), size=max(0, n - 1))
    return [0.0] + [float(t) for t in np.cumsum(gaps)]
