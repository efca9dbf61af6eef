"""The wire format of every Redis stream entry (and report hash) between a stack's processes.

One module, so that every writer writes the same fields: a request re-queued by a preempting decode
or by a succession carries the same `n` and `t` as the gateway's, and the orchestrator sees it.

  stream             message (field `m`)          written by                    read by
  prefill queue      QueuedRequest, + `n`, `t`    gateway; decode (preempted);  prefill (group "prefill"),
                                                  a retiring decode (succession)  orchestrator (`n`, `t` only)
  decode admit       Handoff                      prefill                       decode (group "decode")
  cancel             CancelNotice                 gateway                       every worker (CancelWatcher)
  reply:<gateway>    TokenDeliveries              prefill, decode               that gateway
  timings            IterationSample              workers                       orchestrator, benchmarks
  latencies          RequestLatency               gateway                       orchestrator
  worker:<phase>     WorkerReport (a hash, `m`)   workers                       orchestrator, benchmarks

`m` holds the message's JSON (`contracts.to_json`). A prefill-queue entry also carries `n`, the
tokens prefill has to compute (the prompt plus any tokens already generated: a preempted request is
recomputed with them), and `t`, its arrival time at the gateway, so that the orchestrator sizes the
queue without parsing every prompt.

Writing: a builder returns an `Entry` (stream, fields, cap); `add(target, entry)` XADDs it on any
redis-py object with `xadd`: a client or a pipeline, sync or asyncio (await what it returns then).
Reading: the readers take an entry's fields as Redis returns them (bytes or str keys, bytes or str
values) and raise `EntryError` for an entry that is not what its stream holds.

Pure: no redis import; the callers own their clients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

from services.common.contracts import (CancelNotice, Handoff, IterationSample, KeySpace, QueuedRequest,
                                       RequestLatency, TokenDeliveries, TokenDelivery, WorkerReport,
                                       deliveries_from_json, from_json, to_json)

T = TypeVar("T")

FIELD = "m"                    # every entry's message
TOKENS_FIELD = "n"             # prefill queue: tokens to prefill
ARRIVAL_FIELD = "t"            # prefill queue: arrival time at the gateway (wall clock, repr of a float)

CANCEL_MAXLEN = 100_000        # cancels are read within an iteration; older ones are history
LATENCY_MAXLEN = 10_000        # finished requests kept for SLO attainment
TIMINGS_MAXLEN = 20_000        # iteration samples kept for the performance model


class EntryError(ValueError):
    """An entry that is not what its stream holds (a missing field, bad JSON, wrong fields)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One XADD: where, what, and the stream's approximate cap (None: uncapped)."""

    stream: str
    fields: dict[str, str]
    maxlen: int | None = None


def add(target: Any, entry: Entry) -> Any:
    """XADD `entry` on a redis-py client or pipeline, sync or asyncio; returns what `xadd` returns
    (the entry id, the pipeline, or an awaitable of either)."""
    return target.xadd(entry.stream, entry.fields, maxlen=entry.maxlen, approximate=True)


# ---------------------------------------------------------------------------------------------- writing

def entry(stream: str, message: Any, maxlen: int | None = None) -> Entry:
    """The entry of any contract message on `stream`; a QueuedRequest gets its queue fields too."""
    fields = {FIELD: to_json(message)}
    if isinstance(message, QueuedRequest):
        fields[TOKENS_FIELD] = str(len(message.prompt_token_ids) + len(message.output_token_ids))
        fields[ARRIVAL_FIELD] = repr(message.arrival_time)
    return Entry(stream, fields, maxlen)


def queued(keys: KeySpace, request: QueuedRequest) -> Entry:
    """A request for prefill: new from the gateway, or re-queued (preempted, handed back)."""
    return entry(keys.prefill_queue, request)


def handoff(keys: KeySpace, message: Handoff) -> Entry:
    return entry(keys.decode_admit, message)


def cancel(keys: KeySpace, notice: CancelNotice) -> Entry:
    return entry(keys.cancel, notice, CANCEL_MAXLEN)


def deliveries(reply_to: str, items: Sequence[TokenDelivery]) -> Entry:
    """One worker iteration's tokens for one gateway (`reply_to`: its reply stream)."""
    return entry(reply_to, TokenDeliveries(tuple(items)))


def timing(keys: KeySpace, sample: IterationSample) -> Entry:
    return entry(keys.timings, sample, TIMINGS_MAXLEN)


def latency(keys: KeySpace, sample: RequestLatency) -> Entry:
    return entry(keys.latencies, sample, LATENCY_MAXLEN)


def report_mapping(report: WorkerReport) -> dict[str, str]:
    """The fields of a worker's report hash (`KeySpace.worker_stats`), for HSET's mapping."""
    return {FIELD: to_json(report)}


# ---------------------------------------------------------------------------------------------- reading

def read(cls: type[T], fields: Any) -> T:
    """The message of one entry (its fields as Redis returned them)."""
    raw = _field(fields, FIELD)
    try:
        return from_json(cls, raw)
    except Exception as e:      # anything a bad producer can cause: JSON, missing fields, validation
        raise EntryError(f"not a {cls.__name__} ({type(e).__name__}: {e}): {_preview(raw)}") from None


def read_deliveries(fields: Any) -> tuple[TokenDelivery, ...]:
    """The deliveries of a reply-stream entry (a TokenDeliveries, or a lone TokenDelivery)."""
    raw = _field(fields, FIELD)
    try:
        return deliveries_from_json(raw)
    except Exception as e:
        raise EntryError(f"not a TokenDeliveries ({type(e).__name__}: {e}): {_preview(raw)}") from None


def read_waiting(fields: Any) -> tuple[float, int]:
    """(arrival time, tokens to prefill) of a prefill-queue entry, without parsing its prompt."""
    try:
        return float(_text(_field(fields, ARRIVAL_FIELD))), int(_text(_field(fields, TOKENS_FIELD)))
    except ValueError as e:
        raise EntryError(f"bad prefill-queue entry: {e}") from None


def read_report(raw: str | bytes) -> WorkerReport:
    """A worker's report, as `report_mapping` stored it (the hash's `m`)."""
    return read(WorkerReport, {FIELD: raw})


def _field(fields: Any, name: str) -> Any:
    if isinstance(fields, Mapping):
        raw = fields.get(name.encode(), fields.get(name))
        if raw is not None:
            return raw
    raise EntryError(f"no {name!r} field (fields {_preview(fields)})")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _preview(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
