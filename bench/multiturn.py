"""The multi-turn benchmark's runner: `bench serve`'s run of a workload of Conversations.

A conversation's life here:
  due        its start comes from the Arrival (Poisson or gamma, `rate` conversations/s; inf: all at once)
  waiting    with max_concurrency, for a free slot: at most that many conversations (users) at once,
             each holding its slot for its whole conversation
  turn k     its prompt is the history (system prompt, every earlier user message and answer) and user
             message k, as token ids (bench.conversations.turn_prompt); sent, streamed and timed as
             any `bench serve` request (serve.stream_one: TTFT from this turn's send)
  answered   the answer's token ids as the server streamed them (the gateway always; vLLM with
             return_token_ids), or, from a server that gives only text, the text tokenized by it,
             join the history; the next turn is sent `think_s` after the answer's last token
  failed     a failed turn ends the conversation: its later turns are recorded as failed, unsent

Every turn is one RequestRecord (with its conversation and turn), so the metrics, SLO attainment
and the max rate are bench serve's over all turns; the rate swept is the conversations' start rate.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, replace
from typing import Any, Mapping, Sequence

from bench.clients import BenchClient, StreamChunk, open_client
from bench.conversations import (Conversation, conversations_for_run, conversations_with_token_ids,
                                 turn_prompt)
from bench.datasets import REAL_TEXT, Arrival, RequestSpec, process_offsets
from bench.serve import (DEFAULT_PERCENTILES, REQUEST_TIMEOUT_S, Progress, RequestRecord, Result, stream_one,
                         check_fit, compute_metrics)


async def prepare_conversations(client: BenchClient, convs: Sequence[Conversation],
                                runs: Sequence[int]) -> list[list[Conversation]]:
    """Token ids for conversations without them (the served model's tokenizer), one variant per run
    (conversations_for_run); the longest turn of each conversation must fit the model."""
    info = await client.model_info()
    if any(c.user_ids is None for c in convs):
        convs = conversations_with_token_ids(convs, await client.tokenize(REAL_TEXT))
    check_fit(info, [c.max_context() for c in convs], "--system-len, --user-len, --answer-len, --turns")
    return [conversations_for_run(convs, run) for run in runs]


async def answer_ids(client: BenchClient, chunks: Sequence[StreamChunk]) -> list[int]:
    """The answer as token ids: as streamed, or its text tokenized by the server when it sent none."""
    ids = [t for c in chunks for t in c.token_ids]
    if ids or not any(c.text for c in chunks):
        return ids
    return list(await client.tokenize("".join(c.text for c in chunks)))


def turn_records(convs: Sequence[Conversation], first_offsets: Sequence[float]) -> list[list[RequestRecord]]:
    """One record per turn, numbered over the whole workload; later turns' send times are set when due."""
    out, index = [], 0
    for c, (conv, start) in enumerate(zip(convs, first_offsets)):
        records, history = [], conv.system_len
        for t, (user, answer) in enumerate(zip(conv.user_lens, conv.answer_lens)):
            records.append(RequestRecord(index, history + user, answer, start if t == 0 else 0.0,
                                         conversation=c, turn=t))
            history += user + answer
            index += 1
        out.append(records)
    return out


async def converse(client: BenchClient, conv: Conversation, records: Sequence[RequestRecord], t0: float,
                   bar: Progress | None = None) -> None:
    """One conversation's turns, each after the previous answer arrived (and `think_s` more)."""
    history: tuple[int, ...] = tuple(conv.system_ids or ())
    for turn, (user, record) in enumerate(zip(conv.user_ids or (), records)):
        if turn:
            await asyncio.sleep(conv.think_s)
            record.scheduled_s = time.perf_counter() - t0
        prompt = turn_prompt(history, user)
        record.prompt_len = len(prompt)
        chunks: list[StreamChunk] = []
        if bar is not None:
            bar.sent()
        await stream_one(client, RequestSpec(len(prompt), record.output_len, token_ids=prompt), record, t0, chunks)
        if bar is not None:
            bar.finished(record.success)
        if not record.success:
            for later in records[turn + 1:]:
                later.error = f"not sent: turn {turn} of conversation {record.conversation} failed"
                if bar is not None:
                    bar.sent()
                    bar.finished(False)
            return
        if turn + 1 < len(records):
            history = (*prompt, *await answer_ids(client, chunks))


async def benchmark_conversations(target: str, convs: Sequence[Conversation], arrival: Arrival, *,
                                  max_concurrency: int | None = None, slo_ttft_ms: float | None = None,
                                  slo_tpot_ms: float | None = None, warmup: int = 1,
                                  percentiles: Sequence[float] = DEFAULT_PERCENTILES, progress: bool = True,
                                  label: str = "", workload: str = "", access: Mapping[str, Any] | None = None,
                                  run: int = 1) -> Result:
    """bench.serve.benchmark for conversations: `arrival` gives the conversations' starts; `warmup`
    unmeasured requests are first turns of run 0's conversations, one at a time."""
    starts = process_offsets(len(convs), arrival)
    client = open_client(target, REQUEST_TIMEOUT_S, **(access or {}))
    try:
        warm, convs = await prepare_conversations(client, convs, (0, run))
        for i in range(warmup):             # not measured: first-call costs (channel, allocator, caches)
            conv = warm[i % len(warm)]
            first_turn = replace(conv, user_lens=conv.user_lens[:1], answer_lens=conv.answer_lens[:1],
                                 user_ids=(conv.user_ids or ())[:1])
            await converse(client, first_turn, [RequestRecord(-1, 0, conv.answer_lens[0], 0.0)], time.perf_counter())
        per_conv = turn_records(convs, starts)
        bar = Progress(sum(len(r) for r in per_conv), label, enabled=progress)
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(conv: Conversation, records: list[RequestRecord]) -> None:
            if slots is None:
                await converse(client, conv, records, t0, bar)
            else:
                async with slots:
                    await converse(client, conv, records, t0, bar)

        started_at = time.time()
        t0 = time.perf_counter()
        tasks = []
        for conv, records in zip(convs, per_conv):
            delay = t0 + records[0].scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(conv, records)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    finally:
        await client.close()
    records = [r for rs in per_conv for r in rs]
    metrics = compute_metrics(records, duration, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
                              percentiles=percentiles)
    return Result(target=target, label=label, workload=workload, arrival=asdict(arrival),
                  max_concurrency=max_concurrency, started_at=started_at, metrics=metrics, records=tuple(records))
