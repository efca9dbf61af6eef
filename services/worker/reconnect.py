"""What a worker does when Redis goes away and comes back (the shared helpers: services/common/redis_retry.py).

A worker's life through a Redis outage:
  running    a Redis command of an iteration raises a connection error (the loop's read, an
             allocation, the publisher's MULTI/EXEC, a release): the iteration stops where it stood
             and the loop calls `resync`
  let go     everything the worker holds in memory goes: the pipelines the publisher has not sent
             (built from a state Redis may or may not have reached), the scheduler's requests and
             their tracking. Nothing is lost with them: a request's input entry stays pending with
             this worker until the transaction that hands it on (or ends it) lands, and decode
             records each token and the request's block table in Redis in the transaction that
             delivers the token
  waiting    PING with backoff until Redis answers; a SIGTERM meanwhile ends the worker
  rejoined   heartbeat, consumer group and report written again; the entries pending with this
             worker are read back (XREADGROUP from id 0) and taken up as a restarted worker takes up
             a dead one's (`Worker.take_over`): prefill frees their blocks and recomputes them, decode
             resumes each from its recorded tokens and blocks with its KV in place. The transaction
             in doubt when the connection dropped either landed (its requests were acked: nothing is
             pending for them) or not (still pending: redone); either way each request goes on once,
             and the gateway drops a token it already has (TokenDelivery.position)
  audited    the KV pool is checked: every block in exactly one list (RedisBlockAllocator.audit)
  data lost  Redis came back empty (DataEpoch; or the pool is gone): nothing is pending any more; the
             pool is created again, and the gateway fails the streams it was serving, saying to retry
"""
from __future__ import annotations

import logging

from services.common.redis_blocks import PoolNotInitialized
from services.common.redis_queues import ensure_group, read_own_pending
from services.common.redis_retry import CONNECTION_ERRORS, DataLost, wait_until_up

log = logging.getLogger(__name__)


def is_outage(error: BaseException) -> bool:
    """Errors after which the worker resyncs instead of exiting."""
    return isinstance(error, (*CONNECTION_ERRORS, DataLost, PoolNotInitialized))


def resync(worker, error: BaseException) -> None:
    """After `error` (an outage): let go, wait for Redis, rejoin. Returns at once if the worker is
    told to stop meanwhile. `worker` is a services.worker.loop.Worker (no import: it imports us)."""
    worker.outage.lost(error)
    worker.publisher.abandon()
    worker.inputs.abandon()
    held = worker.let_go()
    lost = isinstance(error, (DataLost, PoolNotInitialized))
    while wait_until_up(worker.client, worker.control.wait_stopping):
        try:
            lost = worker.epoch.rejoin(worker.client) or lost
            taken = _rejoin(worker, lost, held)
        except CONNECTION_ERRORS:
            continue                  # gone again before we were done: wait once more
        worker.outage.back(f"requests taken up again: {taken} (it held {held})")
        return


def _rejoin(worker, lost: bool, held: int) -> int:
    """Everything a reconnected worker writes and reads again; -> the requests it took up. Safe to
    repeat (each step is idempotent), which it is when Redis goes again in the middle."""
    blocks = worker.scheduler.blocks
    if lost:
        log.error("redis came back without its data (no append-only file?): the %d requests this worker "
                  "held are gone (their clients get an error from the gateway); creating the KV pool again",
                  held)
        blocks.init_pool(blocks.num_blocks, blocks.block_size)   # the sizes this worker started with
    ensure_group(worker.client, worker.input_stream, worker.group)
    worker.report()                          # heartbeat first: alive before it owns entries again
    entries = read_own_pending(worker.client, worker.input_stream, worker.group, worker.config.worker_id,
                               worker.input_type)
    worker.take_over(entries)
    audit = blocks.audit()
    if not audit.is_consistent:
        log.error("KV pool after the outage: %d blocks were in no list (returned to the free list), %d "
                  "dropped from the free list (owned too, repeated or out of range), %d in two requests' "
                  "lists (not repairable)", audit.returned, audit.dropped_from_free, audit.shared)
    return len(entries)
