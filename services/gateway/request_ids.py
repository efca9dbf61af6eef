"""Request ids: the one a client names its request by, and the one the engine knows it by.

A request's id here:
  claimed   a client's id is claimed in Redis when its request is accepted (SET NX on
            `keys.request_claim`), so it is unique across every gateway of the stack while the
            request runs: a retry through another gateway, or after a gateway restart, is refused
            instead of running twice. An id the gateway makes up is unique already: nothing claimed
  engine    the workers get the client's id with a random suffix: a request id can be used again as
            soon as its request has ended (a cancel the workers remember for the old request never
            matches the new one), and no two requests in the engine ever share an id
  refreshed a running request renews its claim every REFRESH_S; a claim expires CLAIM_TTL_S after
            that, so the ids of a gateway that died become usable again
  released  when the request ends, whatever the way (compare-and-delete: a claim that expired and was
            taken by another request is left alone)
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.contracts import KeySpace
from services.gateway.errors import InvalidInput

MAX_REQUEST_ID_CHARS = 128
CLAIM_TTL_S = 300
REFRESH_S = 60
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass
class RequestIds:
    client_id: str                  # what the client sees
    engine_id: str                  # what QueuedRequest, deliveries and cancels carry
    claim_key: str | None           # None: made up by the gateway, nothing claimed
    refreshed_at: float = 0.0


async def claim(client: aioredis.Redis, keys: KeySpace, given: str) -> RequestIds:
    """The ids of a new request (InvalidInput if `given` is malformed or already running)."""
    if not given:
        made_up = f"req-{uuid.uuid4().hex}"
        return RequestIds(made_up, made_up, None)
    if len(given) > MAX_REQUEST_ID_CHARS or not given.isprintable():
        raise InvalidInput(f"request_id: at most {MAX_REQUEST_ID_CHARS} printable characters")
    ids = RequestIds(given, f"{given}#{uuid.uuid4().hex[:12]}", keys.request_claim(given), time.monotonic())
    if not await client.set(ids.claim_key, ids.engine_id, nx=True, ex=CLAIM_TTL_S):
        raise InvalidInput(f"request_id: {given!r} is already running on this stack; wait until it ends "
                           "or use another id")
    return ids


def resent(pipe: aioredis.client.Pipeline, ids: RequestIds) -> RequestIds:
    """The ids of a request sent again (its pair died): a new engine id (the client's, a new suffix);
    the claim's value follows it, queued on `pipe`, so the release at its end still matches."""
    new = RequestIds(ids.client_id, f"{ids.client_id}#{uuid.uuid4().hex[:12]}", ids.claim_key, time.monotonic())
    if new.claim_key is not None:
        pipe.set(new.claim_key, new.engine_id, xx=True, ex=CLAIM_TTL_S)
    return new


async def refresh(client: aioredis.Redis, ids: RequestIds) -> None:
    """Renew a running request's claim when it is due (one SET every REFRESH_S at most)."""
    now = time.monotonic()
    if ids.claim_key is not None and now - ids.refreshed_at >= REFRESH_S:
        ids.refreshed_at = now
        await client.set(ids.claim_key, ids.engine_id, xx=True, ex=CLAIM_TTL_S)


async def release(client: aioredis.Redis, ids: RequestIds) -> None:
    if ids.claim_key is not None:
        await client.eval(_RELEASE, 1, ids.claim_key, ids.engine_id)
