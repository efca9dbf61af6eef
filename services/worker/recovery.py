"""Finding the work a dead worker left behind in its consumer group, and taking it over.

A worker's life as its peers see it:
  alive       its heartbeat, `keys.worker_alive(worker_id)` = "host pid start_time", is rewritten with
              each of its reports (a busy worker's at most every 50 ms, an idle one's every 2 s) and
              expires after LIVENESS_TTL_S
  dead        the heartbeat expired; or it names a process on this host that is gone (no such pid, or
              one with another start time), which is known at once: a worker the supervisor restarts
              takes over from its predecessor without waiting for the expiry
  taken over  a live worker of the same group (the restarted one, or a peer) lists the group's
              consumers, claims every entry pending with a dead one (they stay pending, now its own,
              until it acks them) and removes that consumer. The loop admits what was claimed where
              the client's stream stopped: prefill recomputes the prompt (blocks the dead one had
              half-filled are freed first); colocated recomputes the prompt and the tokens it had
              delivered, then draws the next; decode resumes the request in place. Both read those
              tokens back from the record the dead one kept with every delivery (`read_progress`)
Scanned when the worker starts and every SCAN_INTERVAL_S while it runs. A standby taking over at a
retune (succession.py) claims its predecessor's entries the same way, so the same holds after it.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Callable

import redis

from services.common.contracts import KeySpace
from services.common.pids import process_start_time
from services.common.redis_queues import group_consumers, take_over_consumer

log = logging.getLogger(__name__)

LIVENESS_TTL_S = 30.0      # a worker silent this long is dead (a long iteration on a slow CPU stays under it)
SCAN_INTERVAL_S = 2.0


def heartbeat_value(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()} {pid} {_start_time(pid)}"


def _start_time(pid: int) -> str:
    """As the heartbeat writes it: "-" when there is no such process."""
    start = process_start_time(pid)
    return "-" if start is None else str(start)


def queue_heartbeat(pipe: redis.client.Pipeline, key: str, value: str) -> None:
    pipe.set(key, value, px=int(LIVENESS_TTL_S * 1000))


def is_dead(heartbeat: str | bytes | None, host: str | None = None) -> bool:
    """Whether a consumer with this heartbeat value (None: expired or never written) is gone."""
    if heartbeat is None:
        return True
    text = heartbeat.decode() if isinstance(heartbeat, bytes) else heartbeat
    parts = text.split()
    if len(parts) != 3 or parts[0] != (host or socket.gethostname()):
        return False               # another host's worker: alive until its heartbeat expires
    pid, start = int(parts[1]), parts[2]
    return start == "-" or _start_time(pid) != start


def take_over_dead(client: redis.Redis, key_of: Callable[[str], str], stream: str, group: str, me: str,
                   cls: type) -> list[tuple[str, object]]:
    """Claim every entry pending with a dead consumer of `group` on `stream` for `me`; -> the entries."""
    taken: list[tuple[str, object]] = []
    for name, pending in group_consumers(client, stream, group):
        if name == me or not is_dead(client.get(key_of(name))):
            continue
        entries = take_over_consumer(client, stream, group, me, name, cls)
        if pending or entries:
            log.warning("worker %s is gone: took over its %d pending entries of %s", name, len(entries), stream)
        taken.extend(entries)
    return taken


def read_progress(client: redis.Redis, keys: KeySpace, request_ids: list[str]) -> list[tuple[int, ...]]:
    """Each request's tokens delivered since its input entry, as the worker that held it recorded them
    with each delivery (`keys.decode_progress`: decode and colocated); one round trip."""
    pipe = client.pipeline(transaction=False)
    for request_id in request_ids:
        pipe.lrange(keys.decode_progress(request_id), 0, -1)
    return [tuple(int(t) for t in tokens) for tokens in pipe.execute()]
