"""The gateways of a stack as they see each other in Redis: one lease per gateway id, and a registry.

Each gateway process runs under an id of its own, `<configured id>~<8 hex>` (`incarnation_id`): it names
the process's reply stream and record hash (adoption.py), so two processes never share either, and a
configured id that comes back (a supervised restart, a late operator) finds its predecessor's requests
under the predecessor's id, next to its own. A gateway id's life here:
  held      its lease, `keys.gateway_lease(id)` = "host pid start_time holder", names the one live process
            that follows the id's requests (the gateway itself, or the peer that adopted them); that
            process renews it every RENEW_S, and each renewal stamps `keys.gateways[id]` with Redis's
            own clock (one clock for every host); it expires LEASE_TTL_S after the last renewal
  dead      the lease expired, or it names a process on this host that is gone (no such pid, or one
            with another start time): known at once, without waiting for the expiry
  taken     a live gateway sets the lease to its own value with TAKE, one script that checks the lease
            still reads what was seen dead and, for a peer's scan, that the id was last renewed at least
            the grace period ago: of any number of gateways trying at once exactly one wins, and a lease
            renewed meanwhile (the gateway was alive after all) is left alone
  released  the holder is done with the id's requests: lease, record hash and registry entry deleted,
            the reply stream set to expire, by RELEASE, one script that does nothing unless the caller
            holds the lease and no record is left (a record written after the adoption is adopted first)
"""
from __future__ import annotations

import json
import os
import socket
import uuid

import redis.asyncio as aioredis

from services.common.contracts import KeySpace
from services.common.pids import process_start_time

RENEW_S = 2.0            # between two renewals of the leases a gateway holds (and its peer scan)
LEASE_TTL_S = 10.0       # a lease not renewed this long is dead: several missed renewals, a stalled loop survives

# KEYS: lease, registry. ARGV: the value seen dead ("" for none), the taker's value, grace ms, id, TTL ms.
_TAKE = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seen = tonumber(redis.call('HGET', KEYS[2], ARGV[4]) or '0')
if now - seen < tonumber(ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[5])
redis.call('HSET', KEYS[2], ARGV[4], now)
return 1
"""
# KEYS: lease, registry. ARGV: the holder's value, id, TTL ms, "1": take it again if it expired unclaimed.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] and (current or ARGV[4] ~= '1') then return 0 end
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return 1
"""
# KEYS: lease, registry, record hash, reply stream. ARGV: the holder's value, id, how long the stream stays (ms).
# The reply stream expires rather than goes: a worker may still publish the last delivery of a request that
# was just cancelled, which would make the stream again, for good, had it been deleted.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HLEN', KEYS[3]) > 0 then return -1 end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""
STREAM_AFTER_RELEASE_S = 60.0
RELEASED, NOT_HELD, RECORDS_LEFT = 1, 0, -1


def incarnation_id(configured: str) -> str:
    return f"{configured}~{uuid.uuid4().hex[:8]}"


def configured_id(gateway_id: str) -> str:
    """The configured id an incarnation runs under (an id without "~" is one of before incarnations)."""
    return gateway_id.rpartition("~")[0] or gateway_id


def lease_value(holder: str, pid: int | None = None) -> str:
    """What a process writes in the leases it holds: where it runs, and its own gateway id."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()} {pid} {process_start_time(pid) or '-'} {holder}"


def holder_of(value: str | bytes | None) -> str:
    """The gateway id of the process a lease names ("" for none)."""
    return "" if value is None else _text(value).split(" ", 3)[-1]


def is_dead(value: str | bytes | None, host: str | None = None) -> bool:
    """Whether the process a lease names is gone (None: the lease expired)."""
    if value is None:
        return True
    parts = _text(value).split(" ", 3)
    if len(parts) != 4 or parts[0] != (host or socket.gethostname()):
        return False           # another host's gateway: alive until its lease expires
    start = process_start_time(int(parts[1])) if parts[1].isdigit() else None
    return start is None or str(start) != parts[2]


async def register(client: aioredis.Redis, keys: KeySpace, gateway_id: str, value: str) -> None:
    """Hold a new id's lease (or the own id's again after Redis lost its data)."""
    await client.eval(_RENEW, 2, keys.gateway_lease(gateway_id), keys.gateways, value, gateway_id,
                      int(LEASE_TTL_S * 1000), "1")


async def renew(client: aioredis.Redis, keys: KeySpace, gateway_id: str, value: str, retake: bool) -> bool:
    """Renew a lease this process holds; -> False when another process holds it now (or, unless
    `retake`, nobody: it was released or lost with Redis's data)."""
    return bool(await client.eval(_RENEW, 2, keys.gateway_lease(gateway_id), keys.gateways, value, gateway_id,
                                  int(LEASE_TTL_S * 1000), "1" if retake else "0"))


async def take(client: aioredis.Redis, keys: KeySpace, gateway_id: str, seen: str | bytes | None, value: str,
               grace_s: float) -> bool:
    """Take the lease of a gateway seen dead with lease `seen`; -> whether this call won it."""
    seen_text = "" if seen is None else _text(seen)
    return bool(await client.eval(_TAKE, 2, keys.gateway_lease(gateway_id), keys.gateways, seen_text, value,
                                  int(grace_s * 1000), gateway_id, int(LEASE_TTL_S * 1000)))


async def release(client: aioredis.Redis, keys: KeySpace, gateway_id: str, value: str) -> int:
    """RELEASED, NOT_HELD (someone else holds it) or RECORDS_LEFT (adopt those first)."""
    return int(await client.eval(_RELEASE, 4, keys.gateway_lease(gateway_id), keys.gateways,
                                 keys.gateway_requests(gateway_id), keys.reply(gateway_id), value, gateway_id,
                                 int(STREAM_AFTER_RELEASE_S * 1000)))


async def leases(client: aioredis.Redis, keys: KeySpace) -> dict[str, bytes | None]:
    """Every registered gateway id with its lease (None: expired)."""
    ids = sorted(_text(i) for i in await client.hkeys(keys.gateways))
    values = await client.mget([keys.gateway_lease(i) for i in ids]) if ids else []
    return dict(zip(ids, values))


async def owner_of(client: aioredis.Redis, keys: KeySpace, gateway_ids: list[str], client_id: str) -> str | None:
    """The gateway id among `gateway_ids` whose records hold a request with this client id."""
    pipe = client.pipeline(transaction=False)
    for gateway_id in gateway_ids:
        pipe.hvals(keys.gateway_requests(gateway_id))
    for gateway_id, records in zip(gateway_ids, await pipe.execute()):
        for raw in records:
            try:
                if json.loads(raw).get("client_id") == client_id:
                    return gateway_id
            except (ValueError, AttributeError):
                continue            # a malformed record: its adopter drops it (adoption.load)
    return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
