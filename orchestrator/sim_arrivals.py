"""Where the simulator's requests come from, and what their prompts hold.

Pure Python. A source hands the simulation its requests in arrival order (`pop`), each with an index
(its place in `arrivals` and in the run's per-request results), a prompt and an output length:
`TraceArrivals` the trace's requests at their rate-scaled times; `orchestrator.sim_conversations`
the turns of conversations, each sent a think time after the previous one's answer.

Prompts' token values only matter with prefix caching, where a block is reused exactly when every
token up to its end matches. Without it a prompt is n zero tokens (`SyntheticPrompt`); with it a
`MarkedPrompt` is zeros with an identity written in a few tokens at one position (a request's own,
or a conversation's after the shared system prompt), so two prompts share blocks only where they
are meant to. Generated tokens are always 0 (the simulator samples 0), so a conversation's next
prompt, its history and a new message, is the same marked prompt, longer.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

from orchestrator.sim_trace import TraceRequest, arrivals_ms
from services.engine.sequence import Sequence as Seq

INF = math.inf
IDENT_BYTES = 8              # an identity in 8 tokens: unique across 2**64 requests or conversations


class SyntheticPrompt(bytes):
    """A prompt of n tokens whose values do not matter (all 0), as n zero bytes: `len` and slices stay
    in C and it takes n bytes rather than a list's 8n. `Sequence.token_slice` concatenates prompt and
    output for every decode chunk; `+` gives zero bytes of the joint length (one memset), not a list."""

    __slots__ = ()

    def __add__(self, other) -> bytes:
        return bytes(len(self) + len(other))


class MarkedPrompt(bytes):
    """Zeros but for an identity: the prompt of a request that shares blocks only with its own
    conversation (prefix caching). `+` appends the output as zeros (the simulator samples token 0)."""

    __slots__ = ()

    @classmethod
    def make(cls, length: int, ident: int, at: int = 0) -> MarkedPrompt:
        """`length` tokens, `ident` (>= 1) in little-endian bytes from position `at` (cut at the end)."""
        if ident < 1:
            raise ValueError("ident must be at least 1: an all-zero prompt shares blocks with every other")
        mark = ident.to_bytes(IDENT_BYTES, "little")
        head = bytes(min(at, length)) + mark[:max(0, length - at)]
        return cls(head + bytes(length - len(head)))

    def __add__(self, other) -> bytes:
        return bytes(self) + bytes(len(other))


class Arrivals(Protocol):
    """A simulation's requests, in the order they reach the engine's input queue."""

    arrivals: list[float]        # by request index: when it was sent (ms); INF until then
    num_requests: int            # how many there will be in all
    next_ms: float               # when the next one reaches the queue (its send + the ingress); INF: none now

    def pop(self) -> tuple[int, bytes, int]: ...          # (index, prompt, output tokens) of that one
    def finished(self, index: int, t_ms: float, seq: Seq) -> None: ...   # its last token at t_ms
    def dropped(self, index: int) -> int: ...             # it was refused: requests that will now never come


class TraceArrivals:
    """A trace's requests at their times, gaps divided by the rate multiple."""

    def __init__(self, trace: Sequence[TraceRequest], rate_multiple: float, ingress_ms: float,
                 distinct: bool) -> None:
        self.trace = trace
        self.arrivals = arrivals_ms(trace, rate_multiple)
        self._enqueued = [a + ingress_ms for a in self.arrivals] if ingress_ms else self.arrivals
        self.num_requests = len(trace)
        self._distinct = distinct      # prefix caching: each prompt its own (a trace says nothing of content)
        self._next = 0
        self._advance()

    def _advance(self) -> None:
        i = self._next
        self.next_ms = self._enqueued[i] if i < self.num_requests else INF

    def pop(self) -> tuple[int, bytes, int]:
        i = self._next
        r = self.trace[i]
        self._next += 1
        self._advance()
        prompt = MarkedPrompt.make(r.prompt_tokens, i + 1) if self._distinct else SyntheticPrompt(r.prompt_tokens)
        return i, prompt, r.output_tokens

    def finished(self, index: int, t_ms: float, seq: Seq) -> None:
        pass                           # open loop: no request waits for another

    def dropped(self, index: int) -> int:
        return 0
