"""What a gateway leaves in Redis for its restarted self: one record per request it owns.

A gateway's id is stable across restarts (`GatewayConfig.gateway_id`: the supervisor restarts it with
the same command line), and so are its reply stream and its record hash:
  accepted   the request's RequestRecord is written to `keys.gateway_requests(gateway_id)` in the same
             transaction as its QueuedRequest: a request is in the queue only with its record
  kept       the reply stream is trimmed no further than the oldest record's `since`, so every token
             of every request in flight stays readable there (the tokens the old gateway had read but
             not yet sent die with it; the stream still has them)
  ended      the record is deleted when the request ends, whatever the way
  adopted    a gateway starting with records under its id (its predecessor was killed) loads them,
             replays its reply stream from the oldest `since` to rebuild each request's output, and
             goes on reading from where the replay stopped; a client then re-attaches (Attach), or
             the request is cancelled after `GatewayConfig.orphan_timeout_s`
"""
from __future__ import annotations

import logging
from typing import AsyncIterator

import redis.asyncio as aioredis

from services.common.contracts import KeySpace, from_json, to_json
from services.gateway.inflight import RequestRecord, stream_id_key

log = logging.getLogger("duoserve.gateway")

PROMPT_TAIL = 16          # prompt tokens kept in a record: more than the detokenizer's context (5)
REPLAY_BATCH = 1000       # reply-stream entries per XREAD while replaying


def save(pipe: aioredis.client.Pipeline, keys: KeySpace, gateway_id: str, record: RequestRecord) -> None:
    """Queue the record's write on `pipe` (the transaction that also queues the request)."""
    pipe.hset(keys.gateway_requests(gateway_id), record.engine_id, to_json(record))


def replace_record(pipe: aioredis.client.Pipeline, keys: KeySpace, gateway_id: str, old_engine_id: str,
                   record: RequestRecord) -> None:
    """Queue the swap of a request's record for one under a new engine id (Frontend.resend)."""
    pipe.hdel(keys.gateway_requests(gateway_id), old_engine_id)
    save(pipe, keys, gateway_id, record)


async def forget(client: aioredis.Redis, keys: KeySpace, gateway_id: str, engine_id: str) -> None:
    await client.hdel(keys.gateway_requests(gateway_id), engine_id)


async def load(client: aioredis.Redis, keys: KeySpace, gateway_id: str) -> list[RequestRecord]:
    """Every record this gateway id left, oldest first (a malformed one is logged and dropped)."""
    records: list[RequestRecord] = []
    for engine_id, raw in (await client.hgetall(keys.gateway_requests(gateway_id))).items():
        try:
            records.append(from_json(RequestRecord, raw))
        except (ValueError, TypeError, KeyError):
            log.warning("malformed request record %r dropped", engine_id)
            await client.hdel(keys.gateway_requests(gateway_id), engine_id)
    return sorted(records, key=lambda r: stream_id_key(r.since))


async def replay(client: aioredis.Redis, stream: str, since: str) -> AsyncIterator[tuple[str, dict]]:
    """Every entry of `stream` after `since`, in order, up to its end when read."""
    cursor = since
    while True:
        batches = await client.xread({stream: cursor}, count=REPLAY_BATCH)
        entries = [entry for _stream, got in batches or () for entry in got]
        if not entries:
            return
        for entry_id, data in entries:
            cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            yield cursor, data
