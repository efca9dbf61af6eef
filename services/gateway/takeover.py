"""Who follows a dead gateway's requests: its successor under the same configured id, or a live peer.

Every gateway of a stack holds the lease of its own gateway id (peers.py) and, every RENEW_S, renews the
leases it holds and scans the registry for dead ones. A dead gateway id's requests (its records and
reply stream, adoption.py) are adopted, by exactly one live gateway (peers.take), once:
  successor  a gateway started under the same configured id takes its predecessors' ids at once, at
             start, before it says SERVING (a supervised restart: what it was before this module)
  attach     a gateway asked to Attach a request it does not hold looks for the id that holds it: a dead
             one is adopted at once and the call served; a live one's (or its adopter's) is refused with
             UNAVAILABLE naming it, which the SDK retries
  peer       any live gateway adopts an id whose lease was last renewed `takeover_s` ago (the grace: a
             supervised restart comes back well within it), for a gateway that never comes back under
             its configured id (no supervisor, or a deployment that moved it: another id)
Adopted requests wait for their clients (Attach); one no client attaches to within the orphan timeout is
cancelled (Frontend.sweep_orphans). When the last request adopted from an id has ended, the adopter
deletes the id's keys and lets its lease go (peers.release). An adopter that dies holds the ids it
adopted in its lease like its own: they are adopted again, with its own, by whoever takes over from it.
A process that finds another holding its own id (it stalled past its lease and was taken over) exits at
once, without a write: its requests are the adopter's (LeaseLost; main).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from services.common.redis_retry import CONNECTION_ERRORS
from services.gateway import adoption, peers
from services.gateway.errors import NotReady
from services.gateway.frontend import Frontend

log = logging.getLogger("duoserve.gateway")


class LeaseLost(Exception):
    """Another process holds this gateway's own id: its requests are no longer this process's to touch."""


@dataclass
class Takeover:
    frontend: Frontend
    takeover_s: float                            # a peer's id is adopted once its lease is this old
    adopted: set[str] = field(default_factory=set)   # other gateway ids whose lease this process holds
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.me = self.frontend.gateway_id
        self.value = peers.lease_value(self.me)      # what this process writes in every lease it holds
        self.frontend.peers = self

    async def start(self) -> int:
        """Hold the own lease, adopt the predecessors' requests; then Attach may be served. -> adopted."""
        frontend = self.frontend
        await peers.register(frontend.client, frontend.keys, self.me, self.value)
        configured = frontend.config.gateway_id
        seen = await peers.leases(frontend.client, frontend.keys)
        seen.setdefault(configured, None)            # records a gateway left before ids had incarnations
        before = len(frontend.requests)
        for gateway_id, lease in seen.items():
            if peers.configured_id(gateway_id) == configured and gateway_id != self.me and peers.is_dead(lease):
                await self._adopt(gateway_id, lease, grace_s=0.0)
        await frontend.start_reading()
        return len(frontend.requests) - before

    async def run(self) -> None:
        """Renew the leases held, adopt the ids dead for `takeover_s`, forever; LeaseLost ends it."""
        while True:
            await asyncio.sleep(peers.RENEW_S)
            try:
                await self.renew()
                for gateway_id in [g for g in self.adopted if not self._follows(g)]:
                    await self.done_with(gateway_id)     # its last end could not let go (Redis was away)
                await self.scan()
            except CONNECTION_ERRORS:
                self.frontend.redis_suspected.set()      # leases are renewed again once Redis is back
            except LeaseLost:
                raise
            except Exception:                            # noqa: BLE001 - serving goes on; tried again next round
                log.exception("gateway takeover round failed")

    async def renew(self) -> None:
        frontend = self.frontend
        if not await peers.renew(frontend.client, frontend.keys, self.me, self.value, retake=True):
            holder = peers.holder_of(await frontend.client.get(frontend.keys.gateway_lease(self.me)))
            raise LeaseLost(f"gateway {holder or '?'} holds this gateway's id {self.me}: it took its requests "
                            f"over (this process did not renew its lease for {peers.LEASE_TTL_S:g} s)")
        for gateway_id in sorted(self.adopted):
            # an expired one (Redis was away longer than the TTL) is taken again: only this process releases it
            if not await peers.renew(frontend.client, frontend.keys, gateway_id, self.value, retake=True):
                holder = peers.holder_of(await frontend.client.get(frontend.keys.gateway_lease(gateway_id)))
                log.error("lost gateway id %s to %s: dropping its %d adopted requests", gateway_id, holder or "nobody",
                          sum(r.origin == gateway_id for r in frontend.requests.values()))
                self.adopted.discard(gateway_id)
                frontend.drop_origin(gateway_id, holder)

    async def scan(self) -> None:
        """Adopt every gateway id whose lease is dead and was last renewed `takeover_s` ago (TAKE checks
        the age with Redis's clock); a successor's own predecessors need no grace."""
        configured = self.frontend.config.gateway_id
        for gateway_id, lease in (await peers.leases(self.frontend.client, self.frontend.keys)).items():
            if gateway_id == self.me or gateway_id in self.adopted or not peers.is_dead(lease):
                continue
            grace = 0.0 if peers.configured_id(gateway_id) == configured else self.takeover_s
            await self._adopt(gateway_id, lease, grace)

    async def adopt_owner_of(self, client_id: str) -> None:
        """An Attach for a request this process does not hold: adopt its gateway id if that is dead;
        NotReady naming the gateway that follows it if alive; nothing if no gateway holds it."""
        frontend = self.frontend
        others = [g for g in (await peers.leases(frontend.client, frontend.keys)) if g != self.me]
        owner = await peers.owner_of(frontend.client, frontend.keys, others, client_id)
        if owner is None:
            return
        async with self._lock(owner):        # an adoption of it in progress (another Attach's) ends first
            if owner in self.adopted:
                return
        lease = await frontend.client.get(frontend.keys.gateway_lease(owner))
        if peers.is_dead(lease) and await self._adopt(owner, lease, grace_s=0.0):
            return
        if owner in self.adopted:                    # another call of this process adopted it meanwhile
            return
        holder = peers.holder_of(await frontend.client.get(frontend.keys.gateway_lease(owner))) or owner
        raise NotReady(f"request {client_id!r} is streamed by gateway {holder}, which is alive: attach there, or "
                       f"retry (this gateway takes it over once that one stops renewing its lease, within "
                       f"{peers.LEASE_TTL_S:g} s of its death)")

    async def done_with(self, gateway_id: str, quiet: bool = False) -> None:
        """The last request adopted from `gateway_id` ended: delete its keys and let the lease go, unless
        records came in after the adoption (a gateway that was only stalled): those are adopted first."""
        frontend = self.frontend
        async with self._lock(gateway_id):
            if self._follows(gateway_id):
                return
            if gateway_id not in self.adopted:           # Redis lost it with its data (rejoin): nothing to free
                frontend.drop_origin(gateway_id, "")
                return
            outcome = await peers.release(frontend.client, frontend.keys, gateway_id, self.value)
            if outcome == peers.RECORDS_LEFT:
                records = await adoption.load(frontend.client, frontend.keys, gateway_id)
                await frontend.take_over(gateway_id, records)
                return
            self.adopted.discard(gateway_id)
            frontend.drop_origin(gateway_id, "")         # nothing left on it: stop reading its reply stream
            if outcome == peers.RELEASED and not quiet:
                log.info("every request adopted from gateway %s has ended; its keys are deleted", gateway_id)

    async def close(self) -> None:
        """After Frontend.shutdown ended every request: the own id's keys deleted, its lease let go."""
        await peers.release(self.frontend.client, self.frontend.keys, self.me, self.value)

    async def rejoin(self) -> None:
        """Redis came back without its data: hold the own lease again. The adopted ids went with it; their
        requests end as every other one then (Frontend.fail_all), and their streams are let go after."""
        await peers.register(self.frontend.client, self.frontend.keys, self.me, self.value)
        self.adopted.clear()

    async def _adopt(self, gateway_id: str, lease: bytes | None, grace_s: float) -> bool:
        """Take `gateway_id`'s lease (if it still reads `lease`) and follow its requests. -> whether won."""
        frontend = self.frontend
        async with self._lock(gateway_id):
            if gateway_id in self.adopted:
                return True
            if not await peers.take(frontend.client, frontend.keys, gateway_id, lease, self.value, grace_s):
                return False
            self.adopted.add(gateway_id)
            records = await adoption.load(frontend.client, frontend.keys, gateway_id)
            count = await frontend.take_over(gateway_id, records)
            how = "after its lease expired" if grace_s else "at once"
            if count:
                log.warning("gateway %s is dead: took over its %d requests in flight (%s); each is cancelled unless "
                            "its client re-attaches within %g s", gateway_id, count, how,
                            frontend.config.orphan_timeout_s)
        if not count:
            await self.done_with(gateway_id, quiet=True)
        return True

    def _follows(self, gateway_id: str) -> bool:
        return any(r.origin == gateway_id for r in self.frontend.requests.values())

    def _lock(self, gateway_id: str) -> asyncio.Lock:
        return self._locks.setdefault(gateway_id, asyncio.Lock())
