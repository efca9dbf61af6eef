"""Re-attaching a stream whose connection to the gateway was lost: the SDK's side of Generation.Attach.

A stream's life here:
  accepted   the gateway queued the request and said so in the call's initial metadata, with the
             request's id (REQUEST_ID_METADATA): from here on the stream can be re-attached
  following  each response adds its tokens to the count the client has
  lost       the call failed with UNAVAILABLE (the gateway was killed or is restarting; through a
             channel that lists several gateways, the next one adopts the request, or says that a
             live one streams it: services/gateway/takeover.py): after a
             backoff (0.1 s doubling to 2 s) the stream calls Attach(id, tokens it has) and goes on
             with the next token; again on UNAVAILABLE, for at most `window_s` after the loss and
             never past the stream's own timeout. The caller sees one stream: no token twice, none
             missing, the text continuing where it stopped
  given up   not accepted yet when lost (nothing ran: retrying the call is safe), another error
             (NOT_FOUND: the request ended or no client came back in time), or the window passed:
             the error is raised, as without re-attaching

Only grpc and the generated stubs: part of the light client install.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import grpc

from duoserve.v1 import generation_pb2 as pb

REQUEST_ID_METADATA = "duoserve-request-id"   # Generate's initial metadata: the request is queued, by this id
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 2.0
DEFAULT_WINDOW_S = 60.0   # a supervised gateway is back within seconds; its requests wait 30 s (orphan timeout)
# The channel tries to reconnect soon after losing its gateway (gRPC's default waits up to 2 minutes).
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000))


@dataclass
class Reattacher:
    """One stream's re-attach state; `attach(request, timeout)` makes the Attach call (a stub's method)."""

    attach: Callable[[pb.AttachRequest, float | None], Any]
    window_s: float                      # how long after a loss to keep trying; 0: never re-attach
    deadline: float | None = None        # the stream's own timeout (time.monotonic()), None: none
    request_id: str | None = None        # known once the gateway has accepted the request
    num_tokens: int = 0                  # completion tokens the caller has received
    lost_at: float | None = None         # when the stream was lost (None: it is not)
    attempts: int = 0                    # Attach calls since the loss

    def received(self, response: pb.GenerateResponse) -> None:
        """A response reached the caller: count its tokens; the stream is healthy again."""
        self.request_id = self.request_id or response.request_id or None
        self.num_tokens += len(response.token_ids)
        self.lost_at, self.attempts = None, 0

    def learn_id(self, metadata: Any) -> None:
        """The request's id from a call's initial metadata, if the gateway sent it (it accepted the request)."""
        for key, value in metadata or ():
            if key == REQUEST_ID_METADATA:
                self.request_id = value

    def delay(self, code: grpc.StatusCode | None, now: float) -> float | None:
        """Seconds to wait before re-attaching after a call failed with `code`; None: give up (raise)."""
        if code != grpc.StatusCode.UNAVAILABLE or self.window_s <= 0 or self.request_id is None:
            return None
        if self.lost_at is None:
            self.lost_at = now
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** self.attempts)
        if now + delay - self.lost_at > self.window_s or (self.deadline is not None and now + delay >= self.deadline):
            return None
        self.attempts += 1
        return delay

    def call(self, now: float) -> Any:
        """The Attach call that goes on from the tokens received (the stream's remaining timeout)."""
        timeout = None if self.deadline is None else max(0.0, self.deadline - now)
        return self.attach(pb.AttachRequest(request_id=self.request_id, num_received_tokens=self.num_tokens),
                           timeout)
