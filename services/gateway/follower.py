"""What one call streams of a request: its chunks, from the token its client already has on.

Pure (no redis, no grpc). A Follower turns the tokens an InFlight has received into text chunks for
one client. A client that re-attaches after `n` tokens gets a Follower that first replays those `n`
tokens into the detokenizer and the stop-string state without sending them: every chunk after that
is what one uninterrupted stream would have sent (no character split, no stop string or held-back
text sent twice or lost).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from services.common.contracts import TokenLogprob
from services.engine.output import Detokenizer, OutputState
from services.gateway.inflight import InFlight


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time_ms: float
    ttft_ms: float
    e2e_ms: float
    cached_tokens: int = 0        # of prompt_tokens, found in the prefix cache (not computed)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed piece of a completion."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when sampling.logprobs is set


class Follower:
    def __init__(self, request: InFlight, detokenizer: Detokenizer, eos_token_ids: Iterable[int],
                 num_received: int = 0) -> None:
        params = request.sampling
        self.request = request
        self.stop_ids = (set() if params.ignore_eos else set(eos_token_ids)) | set(params.stop_token_ids)
        self.state = OutputState(params, detokenizer)
        for token in request.token_ids[:num_received]:     # the client's text so far: replayed, not sent
            self.state.push(token, is_special_stop=token in self.stop_ids)
        self.state.take_text(False)
        self.sent = num_received                           # tokens the client has

    @property
    def hit_stop_string(self) -> bool:
        return self.state.hit_stop_string

    def next_chunk(self, now: float) -> Chunk:
        """The output after the tokens sent, cut at a stop string; `now`: wall clock, for the usage."""
        request, state, start = self.request, self.state, self.sent
        new_ids: list[int] = []
        for token in request.token_ids[start:] if not state.hit_stop_string else ():
            new_ids.append(token)
            state.push(token, is_special_stop=token in self.stop_ids)
            if state.hit_stop_string:
                break
        self.sent = end = start + len(new_ids)
        finish = "stop" if state.hit_stop_string else request.finish if end == len(request.token_ids) else None
        usage = self.usage(now) if finish else None
        # only the tokens kept in this chunk (a stop string may end it inside a delivery)
        logprobs = tuple(request.logprobs[start:end])
        return Chunk(request.record.client_id, tuple(new_ids), state.take_text(finish is not None), finish, usage,
                     logprobs)

    def usage(self, now: float) -> Usage:
        record = self.request.record
        ttft = ((self.request.first_token_at or now) - record.arrival_time) * 1000
        return Usage(record.num_prompt_tokens, self.sent, self.request.queue_time_ms, ttft,
                     (now - record.arrival_time) * 1000, self.request.cached_tokens)
