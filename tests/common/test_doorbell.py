"""The worker's input doorbell against a real redis-server: it rings for entries added to any watched
stream after it started, once per `take`, and not for what was there before."""
from __future__ import annotations

import time

from services.worker.doorbell import InputDoorbell


def _rings_within(bell: InputDoorbell, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if bell.take():
            return True
        time.sleep(0.01)
    return False


def test_rings_for_new_entries_on_any_stream(redis_client, keys):
    a, b = f"{keys.prefix}:in", f"{keys.prefix}:cancel"
    redis_client.xadd(a, {"m": "before"})
    bell = InputDoorbell(redis_client, (a, b), block_ms=100)
    try:
        assert bell.take()                           # the first take reads: the loop finds what came before
        time.sleep(0.3)
        assert not bell.take()                       # ... and the bell does not ring for it
        redis_client.xadd(b, {"m": "cancel"})
        assert _rings_within(bell)
        assert not bell.take()                       # once per take
        redis_client.xadd(a, {"m": "work"})
        assert _rings_within(bell)
    finally:
        bell.close()


def test_a_stream_created_after_the_bell_rings_it(redis_client, keys):
    stream = f"{keys.prefix}:late"
    bell = InputDoorbell(redis_client, (stream,), block_ms=100)
    try:
        bell.take()
        time.sleep(0.2)
        redis_client.xadd(stream, {"m": "1"})
        assert _rings_within(bell)
    finally:
        bell.close()
