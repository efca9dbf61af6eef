"""`duoserve bench serve`: an open-loop load generator against a running stack's gateway, or any
OpenAI-compatible server (`--target http://HOST:PORT`; bench/clients.py has both clients).

A request's life here:
  scheduled  the Arrival gives its send offset (trace, Poisson or gamma); the dispatcher sleeps until then
  waiting    with --max-concurrency, it waits for a free slot (not counted in its latency, as in vLLM)
  sent       one stream: token ids (or text), ignore_eos=True, max_tokens=output_len, temperature 0
  streaming  TTFT at the first chunk carrying tokens; each later chunk carrying tokens adds one ITL
  done       E2E at the last chunk with tokens or a finish reason; the server's usage count, when given,
             is its output tokens; an error (gRPC, HTTP) or finish reason "error" marks it failed

Metrics follow vLLM's benchmarks/benchmark_serving.py (calculate_metrics) exactly:
  duration         first dispatch to the last request done
  throughput       completed / duration; output tokens / duration; (input + output tokens) / duration
  TTFT             send -> first chunk with tokens
  TPOT             (E2E - TTFT) / (output tokens - 1), only requests with more than one output token
  ITL              every gap between consecutive chunks with tokens, pooled over all requests (a chunk
                   can carry several tokens; then the gap is per chunk, as vLLM's)
  E2E              send -> last chunk
  stats            mean, median, std and percentiles (numpy's linear interpolation), in ms
  goodput          requests/s that meet every SLO given (value <= target); a request with one output
                   token counts TPOT 0, as vLLM does
Added here: SLO attainment, the share of *all* requests (failed ones miss) meeting every SLO given.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bench.clients import BenchClient, ServerError, StreamChunk, open_client
from bench.conversations import is_conversations
from bench.datasets import REAL_TEXT, Arrival, RequestSpec, for_run, schedule, with_token_ids
from bench.workloads import Workload
from duoserve.cli_args import client_tls
from services.common.progress import progress as progress_bar

DEFAULT_PERCENTILES = (90.0, 99.0)
REQUEST_TIMEOUT_S = 1800.0          # one request, send to last chunk; a stuck stack fails rather than hangs


@dataclass(slots=True)
class RequestRecord:
    """What happened to one measured request. Times in seconds."""

    index: int                      # position in the workload
    prompt_len: int                 # prompt tokens (the server's count when it reported one)
    output_len: int                 # tokens asked for (max_tokens, ignore_eos)
    scheduled_s: float              # planned send offset from the start of the run
    sent_s: float = 0.0             # actual send offset (later than planned under --max-concurrency)
    success: bool = False           # streamed to the end without an error
    ttft_s: float = 0.0             # send -> first chunk with tokens
    e2e_s: float = 0.0              # send -> last chunk
    itl_s: list[float] = field(default_factory=list)   # gaps between consecutive chunks with tokens
    output_tokens: int = 0          # tokens received (the server's usage count when given)
    finish_reason: str | None = None
    error: str = ""                 # why it failed
    cached_tokens: int | None = None   # prompt tokens the server found in its prefix cache (None: it did not say)
    conversation: int | None = None    # multi-turn: the conversation, and the turn in it (from 0)
    turn: int | None = None

    @property
    def tpot_s(self) -> float:
        """vLLM's TPOT of one request; 0 with at most one output token."""
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """One latency metric over the run, in ms (zeros when there are no samples, as vLLM's `or 0`)."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[str, float]      # "p90" -> value
    count: int                            # samples

    @staticmethod
    def of(values_s: Sequence[float], percentiles: Sequence[float]) -> LatencyStats:
        v = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000
        return LatencyStats(float(np.mean(v)), float(np.median(v)), float(np.std(v)),
                            {f"p{p:g}": float(np.percentile(v, p)) for p in percentiles}, len(values_s))


@dataclass(frozen=True, slots=True)
class Metrics:
    """vLLM's serving metric set, plus SLO attainment."""

    completed: int                  # requests that succeeded
    failed: int
    duration_s: float
    total_input_tokens: int         # over completed requests
    total_output_tokens: int
    request_throughput: float       # completed / duration
    output_throughput: float        # output tokens / s
    total_token_throughput: float   # (input + output tokens) / s
    ttft: LatencyStats
    tpot: LatencyStats              # excludes the first token; requests with one output token left out
    itl: LatencyStats
    e2e: LatencyStats
    slo_ttft_ms: float | None       # the SLOs judged (None: not given)
    slo_tpot_ms: float | None
    good: int | None                # completed requests meeting every SLO given (None: no SLO given)
    request_goodput: float | None   # good / duration
    slo_attainment: float | None    # good / all requests
    total_cached_tokens: int | None = None   # of total_input_tokens, found in the prefix cache (None: not said)


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, *, slo_ttft_ms: float | None = None,
                    slo_tpot_ms: float | None = None,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Metrics:
    """vLLM's calculate_metrics on our records (pure)."""
    done = [r for r in records if r.success]
    ttfts = [r.ttft_s for r in done]
    tpots = [r.tpot_s for r in done if r.output_tokens > 1]
    itls = [gap for r in done for gap in r.itl_s]
    e2es = [r.e2e_s for r in done]
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    good = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(1 for r in done
                   if (slo_ttft_ms is None or r.ttft_s * 1000 <= slo_ttft_ms)
                   and (slo_tpot_ms is None or r.tpot_s * 1000 <= slo_tpot_ms))
    dur = duration_s if duration_s > 0 else math.nan
    return Metrics(
        completed=len(done), failed=len(records) - len(done), duration_s=duration_s,
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(done) / dur, output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        ttft=LatencyStats.of(ttfts, percentiles), tpot=LatencyStats.of(tpots, percentiles),
        itl=LatencyStats.of(itls, percentiles), e2e=LatencyStats.of(e2es, percentiles),
        slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, good=good,
        request_goodput=None if good is None else good / dur,
        slo_attainment=None if good is None else (good / len(records) if records else 0.0),
        total_cached_tokens=(sum(r.cached_tokens or 0 for r in done)
                             if any(r.cached_tokens is not None for r in done) else None))


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark run: its settings, metrics and every request."""

    target: str
    label: str                      # what was run (a config name in a comparison)
    workload: str                   # the dataset, in words
    arrival: dict[str, Any]         # the Arrival's fields
    max_concurrency: int | None
    started_at: float               # unix time
    metrics: Metrics
    records: tuple[RequestRecord, ...]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["records"] = [asdict(r) | {"tpot_s": r.tpot_s} for r in self.records]
        return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

class Progress:
    """A bar of finished requests with the running and failed counts, on stderr while a run lasts
    (only on a terminal: services/common/progress.py)."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.bar = progress_bar(total=total, desc=label, unit="req", enabled=enabled)
        self.running = self.failed = 0

    def sent(self) -> None:
        self.running += 1
        self.bar.set_postfix(running=self.running, failed=self.failed)

    def finished(self, success: bool) -> None:
        self.running -= 1
        self.failed += not success
        self.bar.set_postfix(running=self.running, failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def stream_one(client: BenchClient, spec: RequestSpec, record: RequestRecord, t0: float,
               keep: list[StreamChunk] | None = None) -> None:
    """Send one request and time it into `record`; its chunks are appended to `keep` when given
    (with token ids: a conversation's next turn resends the answer)."""
    first = last_tokens = 0.0
    st = time.perf_counter()
    record.sent_s = st - t0
    try:
        async with contextlib.aclosing(client.stream(spec, answer_ids=keep is not None)) as chunks:
            async for chunk in chunks:
                now = time.perf_counter()
                if keep is not None:
                    keep.append(chunk)
                if chunk.num_tokens:
                    if not first:
                        first = now
                        record.ttft_s = now - st
                    else:
                        record.itl_s.append(now - last_tokens)
                    last_tokens = now
                    record.output_tokens += chunk.num_tokens
                if chunk.num_tokens or chunk.finish_reason is not None:
                    record.e2e_s = now - st      # not at a usage-only event after the last token (vLLM's E2E)
                record.finish_reason = chunk.finish_reason or record.finish_reason
                record.output_tokens = chunk.completion_tokens or record.output_tokens
                record.prompt_len = chunk.prompt_tokens or record.prompt_len
                record.cached_tokens = chunk.cached_tokens if chunk.cached_tokens is not None else record.cached_tokens
        if record.finish_reason in (None, "error", "cancelled") or not first:
            record.error = f"finish reason {record.finish_reason}, {record.output_tokens} tokens"
        else:
            record.success = True
    except Exception as e:                       # noqa: BLE001: every failure is a failed request, recorded
        record.error = f"{type(e).__name__}: {e}"


async def _prepare(client: BenchClient, specs: Sequence[RequestSpec],
                   runs: Sequence[int] = (1,)) -> list[list[RequestSpec]]:
    """Token ids from real text for specs without a prompt, in one variant per run of `runs`
    (datasets.for_run: ids cut from the corpus, here or by the caller; prompts given as text or token
    ids are sent as given); each text prompt's real length; fit checks."""
    info = await client.model_info()
    out = list(specs)
    if any(s.prompt is None and s.token_ids is None for s in out):
        out = with_token_ids(out, await client.tokenize(REAL_TEXT))
    for i, s in enumerate(out):
        if s.prompt is not None:
            out[i] = RequestSpec(len(await client.tokenize(s.prompt)) or 1, s.output_len, s.arrival_s, s.prompt)
    check_fit(info, [s.prompt_len + s.output_len for s in out], "--length-scale, --input-len")
    return [for_run(out, run) for run in runs]


def check_fit(info: Mapping[str, Any], lengths: Sequence[int], knobs: str) -> None:
    """Every request's prompt + output within the served model's context and KV pool (model_info)."""
    # An OpenAI server does not say its KV pool (None), and may not say its context either.
    kv_tokens = info["num_kv_blocks"] * info["block_size"] if info.get("num_kv_blocks") else None
    limit = min((x for x in (info.get("max_context"), kv_tokens) if x), default=None)
    too_long = [i for i, n in enumerate(lengths) if limit is not None and n > limit]
    if too_long:
        raise ValueError(f"{len(too_long)} requests do not fit the served model's {limit} tokens "
                         f"(context {info.get('max_context')}, KV pool {kv_tokens}), e.g. #{too_long[0]}: "
                         f"{lengths[too_long[0]]} tokens; lower the lengths ({knobs})")


async def benchmark(target: str, specs: Workload, arrival: Arrival, *,
                    max_concurrency: int | None = None, slo_ttft_ms: float | None = None,
                    slo_tpot_ms: float | None = None, warmup: int = 1,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES, progress: bool = True,
                    label: str = "", workload: str = "", access: Mapping[str, Any] | None = None,
                    run: int = 1) -> Result:
    """Run the workload once against `target`: a gateway's HOST:PORT or an OpenAI server's http://HOST:PORT.
    `access`: open_client's api_key, tls and server_name, for a stack that wants them. `run` numbers
    the runs against one server (datasets.for_run: no run's prompts made from the corpus hit another's
    prefix cache; the warm-up requests are run 0). A multi-turn workload (bench.conversations) runs
    in bench.multiturn: `arrival` is then its conversations' starts."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("max concurrency must be at least 1")
    if is_conversations(specs):
        from bench.multiturn import benchmark_conversations
        return await benchmark_conversations(
            target, specs, arrival, max_concurrency=max_concurrency, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
            warmup=warmup, percentiles=percentiles, progress=progress, label=label, workload=workload,
            access=access, run=run)
    offsets = schedule(specs, arrival)
    client = open_client(target, REQUEST_TIMEOUT_S, **(access or {}))
    try:
        warm_specs, specs = await _prepare(client, specs, (0, run))
        for i in range(warmup):             # not measured: first-call costs (channel, allocator, caches)
            spec = warm_specs[i % len(warm_specs)]
            warm = RequestRecord(-1, spec.prompt_len, spec.output_len, 0.0)
            await stream_one(client, spec, warm, time.perf_counter())
        records = [RequestRecord(i, s.prompt_len, s.output_len, offsets[i]) for i, s in enumerate(specs)]
        bar = Progress(len(specs), label, enabled=progress)
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def run(spec: RequestSpec, record: RequestRecord) -> None:
            if slots is None:
                await stream_one(client, spec, record, t0)
            else:
                async with slots:
                    await stream_one(client, spec, record, t0)
            bar.finished(record.success)

        started_at = time.time()
        t0 = time.perf_counter()
        tasks = []
        for spec, record in zip(specs, records):
            delay = t0 + record.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run(spec, record)))
            bar.sent()
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    finally:
        await client.close()
    metrics = compute_metrics(records, duration, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
                              percentiles=percentiles)
    return Result(target=target, label=label, workload=workload, arrival=asdict(arrival),
                  max_concurrency=max_concurrency, started_at=started_at, metrics=metrics, records=tuple(records))


def run_benchmark(target: str, requests: Workload, arrival: Arrival, **kwargs: Any) -> Result:
    """Blocking form of `benchmark` (its own event loop), for scripts and `bench compare`."""
    return asyncio.run(benchmark(target, requests, arrival, **kwargs))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def format_result(result: Result) -> str:
    """vLLM's result block, plus goodput and attainment."""
    m = result.metrics
    rows: list[tuple[str, Any]] = [
        ("Successful requests:", m.completed), ("Failed requests:", m.failed),
        ("Benchmark duration (s):", f"{m.duration_s:.2f}"),
        ("Total input tokens:", m.total_input_tokens), ("Total generated tokens:", m.total_output_tokens),
        ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
    ]
    if m.request_goodput is not None:
        rows.append(("Request goodput (req/s):", f"{m.request_goodput:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
             ("Total Token throughput (tok/s):", f"{m.total_token_throughput:.2f}")]
    if m.total_cached_tokens is not None:
        rows.append(("Cached prompt tokens:", f"{m.total_cached_tokens} ({cached_share(m):.0%})"))
    lines = [f"{' Serving Benchmark Result ':=^50}",
             f"{'Workload:':<32} {result.workload}", f"{'Arrivals:':<32} {_describe_arrival(result)}"]
    lines += [f"{k:<40} {v:<10}" for k, v in rows]
    for title, name, stats in (("Time to First Token", "TTFT", m.ttft),
                               ("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
                               ("Inter-token Latency", "ITL", m.itl), ("End-to-end Latency", "E2EL", m.e2e)):
        lines.append(f"{title:-^50}")
        lines.append(f"{f'Mean {name} (ms):':<40} {stats.mean_ms:<10.2f}")
        lines.append(f"{f'Median {name} (ms):':<40} {stats.median_ms:<10.2f}")
        for p, v in stats.percentiles_ms.items():
            lines.append(f"{f'P{p[1:]} {name} (ms):':<40} {v:<10.2f}")
    if m.slo_attainment is not None:
        slo = " and ".join(s for s in (f"TTFT <= {m.slo_ttft_ms:g} ms" if m.slo_ttft_ms is not None else "",
                                       f"TPOT <= {m.slo_tpot_ms:g} ms" if m.slo_tpot_ms is not None else "") if s)
        lines.append(f"{'SLO: ' + slo:-^50}")
        lines.append(f"{'SLO attainment (%):':<40} {m.slo_attainment * 100:<10.1f}")
        lines.append(f"{'Requests meeting the SLO:':<40} {m.good}/{m.completed + m.failed}")
    failures = [r for r in result.records if not r.success]
    if failures:
        lines.append(f"first failure: #{failures[0].index}: {failures[0].error}")
    lines.append("=" * 50)
    return "\n".join(lines)


def cached_share(m: Metrics) -> float:
    """Prompt tokens the server found in its prefix cache, as a share of all (0 when it did not say)."""
    return (m.total_cached_tokens or 0) / m.total_input_tokens if m.total_input_tokens else 0.0


def _describe_arrival(result: Result) -> str:
    text = Arrival(**result.arrival).describe()
    return text + (f", at most {result.max_concurrency} at once" if result.max_concurrency else "")


# ---------------------------------------------------------------------------------------------
# Command line (parsed in duoserve/cli.py; --dataset and the arrival flags in bench/workloads.py)
# ---------------------------------------------------------------------------------------------

def run_from_args(args: argparse.Namespace) -> int:
    from bench.workloads import arrival_from_args, workload_from_args
    from duoserve.errors import DuoserveError
    specs, words = workload_from_args(args)
    arrival = arrival_from_args(args)
    try:
        result = run_benchmark(args.target, specs, arrival, max_concurrency=args.max_concurrency,
                               slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, warmup=args.warmup,
                               progress=not args.no_progress, workload=words,
                               access={"api_key": args.api_key, "tls": client_tls(args.tls_ca),
                                       "server_name": args.server_name})
    except (DuoserveError, ServerError, OSError) as e:   # the server unreachable or refusing the set-up calls
        print(f"duoserve: error: {args.target}: {e}", file=sys.stderr)
        return 1
    print(format_result(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result.to_json(), indent=1))
        print(f"result written to {args.output}", file=sys.stderr)
    return 0 if result.metrics.completed else 1
