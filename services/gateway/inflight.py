"""One request the gateway owns: every token it has received for it, and which call streams it now.

Pure (asyncio only: no redis, no grpc). The gateway keeps the whole output of each request it owns,
so a client can come back (`Frontend.attach`) and be sent exactly what it is missing.

A request's life here:
  tracked     accepted by Generate (a subscriber from the start), or adopted from the record of a
              gateway that died (its predecessor under the same configured id, or a peer: takeover.py;
              no subscriber yet: an orphan until a client attaches)
  receiving   `add` appends each delivery's tokens at their positions: a token delivered again (a
              worker recomputed it, or the reply stream is replayed) is kept once
  streamed    one subscriber at a time follows it from a token index; a new one (Attach) takes over
              and the previous one ends (`is_current` turns false)
  ended       finished and sent, cancelled, failed, or an orphan for longer than the orphan timeout
  lost        another gateway took over the gateway id it is recorded under (this process had stalled
              past its lease): the call streaming it ends with UNAVAILABLE, so its client re-attaches
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from services.common.contracts import TokenDelivery, TokenLogprob
from services.engine.sampling_params import SamplingParams


def stream_id_key(entry_id: str | bytes) -> tuple[int, int]:
    """A Redis stream id ("1700000000000-3") as a comparable (milliseconds, sequence) pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the gateway must know about a request to stream it (and a successor to adopt it).
    Stored as JSON in `keys.gateway_requests(gateway_id)` while the request runs (`adoption.py`)."""

    client_id: str                     # the id the client knows (and attaches by)
    engine_id: str                     # the id queues, deliveries and cancels carry (request_ids.py)
    claimed: bool                      # client_id is claimed in Redis (keys.request_claim): release it at the end
    prompt_tail: tuple[int, ...]       # the prompt's last tokens: the detokenizer's context for the completion
    num_prompt_tokens: int
    sampling: SamplingParams           # stop strings, EOS handling and logprobs are applied here
    arrival_time: float                # wall clock when the first gateway accepted it
    since: str                         # an id of this gateway's reply stream older than any delivery of it:
                                       # the stream is kept from the oldest request's `since`, and replayed
                                       # from there by a successor
    pair: str = ""                     # the key prefix of the pair it runs on (duoserve/pairs.py); "": the
                                       # gateway's own (one pair)
    prior_tokens: tuple[int, ...] = () # output tokens it had when it was sent again under this engine id
                                       # (its pair died: Frontend.resend); deliveries under the id follow them


@dataclass
class InFlight:
    record: RequestRecord
    origin: str = ""                   # the gateway id whose record hash holds it and whose reply stream
                                       # carries its deliveries: this process's own, or one it adopted
    token_ids: list[int] = field(default_factory=list)          # every output token so far, in order
    logprobs: list[TokenLogprob] = field(default_factory=list)  # parallel to token_ids when asked for
    finish: str | None = None          # the workers' finish reason, once delivered
    error: str = ""                    # with finish "error"
    queue_time_ms: float = 0.0
    cached_tokens: int = 0             # prompt tokens prefill found in the prefix cache
    first_token_at: float | None = None    # wall clock the first token reached this gateway (or its predecessor)
    last_token_at: float | None = None
    last_delivery: float = field(default_factory=time.monotonic)   # for the stall timeout
    subscriber: int = 0                # the current subscriber's number; 0: none
    orphan_since: float | None = None  # monotonic; set while no client follows it after an adoption
    is_running: bool = False           # a delivery came (prefill started it)
    lost_to: str = ""                  # the gateway that took it over from this process (see "lost")
    prompt_ids: tuple[int, ...] = ()   # the whole prompt, for a request this process accepted: sent again
                                       # to another pair if its own dies (an adopted one has only the tail)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _subscribers: int = 0

    @property
    def sampling(self) -> SamplingParams:
        return self.record.sampling

    def add(self, delivery: TokenDelivery, now: float) -> int:
        """Take one delivery (`now`: its wall-clock time); -> how many tokens were new."""
        delivery = delivery.after(len(self.token_ids))
        new = delivery.token_ids
        self.token_ids.extend(new)
        self.logprobs.extend(delivery.logprobs)
        if delivery.queue_time_ms is not None:
            self.queue_time_ms = delivery.queue_time_ms
        if delivery.cached_tokens:         # decode's first delivery says 0: prefill's count stands
            self.cached_tokens = max(self.cached_tokens, delivery.cached_tokens)
        if new:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        if delivery.finish_reason is not None and self.finish is None:
            self.finish, self.error = delivery.finish_reason, delivery.error
        self.is_running = True
        self.last_delivery = time.monotonic()
        self.changed.set()
        return len(new)

    def subscribe(self) -> int:
        """A new call follows this request from now on; the previous one (if any) is woken to leave."""
        self._subscribers += 1
        self.subscriber = self._subscribers
        self.orphan_since = None
        self.changed.set()
        return self.subscriber

    def is_current(self, subscriber: int) -> bool:
        return self.subscriber == subscriber

    def is_orphan_for(self, timeout_s: float, now: float) -> bool:
        """No client has followed it for `timeout_s` since it was adopted."""
        return self.subscriber == 0 and self.orphan_since is not None and now - self.orphan_since >= timeout_s

    async def wait_for_more(self, subscriber: int, num_sent: int, stall_timeout_s: float) -> bool:
        """Wait until there is output past `num_sent`, a finish, or another subscriber;
        -> False when nothing came for `stall_timeout_s` since the last delivery."""
        while True:
            self.changed.clear()
            if (len(self.token_ids) > num_sent or self.finish is not None or not self.is_current(subscriber)
                    or self.lost_to):
                return True
            left = stall_timeout_s - (time.monotonic() - self.last_delivery)
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=left)
            except asyncio.TimeoutError:
                pass


def oldest_since(requests: list[InFlight], cursor: str) -> str:
    """Where a reply stream may be trimmed to: before every delivery a request in flight on it (`requests`:
    those of its gateway id) still needs."""
    return min([cursor, *(r.record.since for r in requests)], key=stream_id_key)
