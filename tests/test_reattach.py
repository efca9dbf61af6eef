"""The SDK's re-attach decisions (duoserve.reattach), as plain Python: when to try again, how long to
wait, what the Attach call carries. The real thing (a gateway killed under load) is tests/chaos/test_gateway.py."""
from __future__ import annotations

import grpc
import pytest

from duoserve.reattach import FIRST_DELAY_S, MAX_DELAY_S, REQUEST_ID_METADATA, Reattacher
from duoserve.v1 import generation_pb2 as pb

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def make(window_s: float = 60.0, deadline: float | None = None) -> tuple[Reattacher, list]:
    calls: list = []
    return Reattacher(lambda request, timeout: calls.append((request, timeout)) or "call", window_s, deadline), calls


def test_only_an_accepted_request_is_reattached():
    r, _ = make()
    assert r.delay(UNAVAILABLE, now=0.0) is None             # never accepted: nothing ran, raise as before
    r.learn_id((("other", "x"),))
    assert r.delay(UNAVAILABLE, now=0.0) is None
    r.learn_id(((REQUEST_ID_METADATA, "req-1"),))
    assert r.delay(UNAVAILABLE, now=0.0) == FIRST_DELAY_S


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, None])
def test_other_errors_are_raised(code):
    r, _ = make()
    r.request_id = "req-1"
    assert r.delay(code, now=0.0) is None


def test_backoff_doubles_to_a_cap_and_stops_after_the_window():
    r, _ = make(window_s=10.0)
    r.request_id = "req-1"
    delays, now = [], 0.0
    while (d := r.delay(UNAVAILABLE, now)) is not None:
        delays.append(d)
        now += d
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 1.6] and max(delays) == MAX_DELAY_S
    assert sum(delays) <= 10.0 < sum(delays) + MAX_DELAY_S


def test_a_response_resets_the_backoff_and_counts_its_tokens():
    r, calls = make()
    r.learn_id(((REQUEST_ID_METADATA, "req-1"),))
    r.received(pb.GenerateResponse(request_id="req-1", token_ids=[5, 6]))
    assert r.delay(UNAVAILABLE, now=0.0) == FIRST_DELAY_S
    assert r.delay(UNAVAILABLE, now=0.1) == 2 * FIRST_DELAY_S
    r.received(pb.GenerateResponse(request_id="req-1", token_ids=[7]))
    assert (r.num_tokens, r.lost_at, r.attempts) == (3, None, 0)
    assert r.delay(UNAVAILABLE, now=100.0) == FIRST_DELAY_S  # a new loss: a new window
    assert r.call(now=100.0) == "call"
    request, timeout = calls[0]
    assert (request.request_id, request.num_received_tokens, timeout) == ("req-1", 3, None)


def test_the_streams_own_timeout_bounds_it():
    r, calls = make(deadline=5.0)
    r.request_id = "req-1"
    assert r.delay(UNAVAILABLE, now=4.95) is None            # the wait would end past the deadline
    assert r.delay(UNAVAILABLE, now=1.0) == FIRST_DELAY_S
    r.call(now=2.0)
    assert calls[0][1] == 3.0                                # the Attach call gets what is left


def test_zero_window_never_reattaches():
    r, _ = make(window_s=0)
    r.request_id = "req-1"
    assert r.delay(UNAVAILABLE, now=0.0) is None
