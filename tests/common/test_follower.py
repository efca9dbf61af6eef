"""A client re-attaching after any number of tokens gets exactly the rest of what one uninterrupted
stream sends: tokens, text (stop strings, held-back text, characters split over two tokens) and the
end (services.gateway.follower; pure, no Redis)."""
from __future__ import annotations

import pytest

from services.common.contracts import TokenDelivery, TokenLogprob
from services.engine.sampling_params import SamplingParams
from services.gateway.follower import Chunk, Follower
from services.gateway.inflight import InFlight, RequestRecord

HALF = 1000         # a token id >= HALF is the first half of a character: its text comes with the next token
EOS = 0


class _Detokenizer:
    """Token id t < HALF is chr(t); HALF + c holds chr(c) back until the next token completes it."""

    def __init__(self) -> None:
        self.text = ""
        self.pending: str | None = None

    def push(self, token_id: int) -> str:
        if token_id >= HALF:
            self.pending = chr(token_id - HALF)
            return ""
        delta = (self.pending or "") + chr(token_id)
        self.pending = None
        self.text += delta
        return delta


def tokens_of(text: str) -> list[int]:
    """'é' is two tokens (HALF + ord('é'), then a 1, which adds nothing); the rest one each."""
    out: list[int] = []
    for c in text:
        out += [HALF + ord(c), 1] if c == "é" else [ord(c)]
    return out


def make_request(params: SamplingParams) -> InFlight:
    return InFlight(RequestRecord("c", "c#1", False, (5,), 1, params, 100.0, "0-0"))


def uninterrupted(tokens: list[int], params: SamplingParams, finish: str) -> list[Chunk]:
    """One token per delivery, one chunk per delivery, as a client that never lost its stream sees it."""
    request = make_request(params)
    follower = Follower(request, _Detokenizer(), (EOS,))
    chunks = []
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        request.add(TokenDelivery("c#1", (token,), finish if last else None, position=i,
                                  logprobs=(TokenLogprob(token, -1.0),)), 101.0 + i)
        chunks.append(follower.next_chunk(200.0))
        if chunks[-1].finish_reason:
            break
    return chunks


def reattached(tokens: list[int], params: SamplingParams, finish: str, num_received: int) -> list[Chunk]:
    """Everything has arrived (the replay at adoption); the client comes back with `num_received`."""
    request = make_request(params)
    request.add(TokenDelivery("c#1", tuple(tokens), finish, position=0,
                              logprobs=tuple(TokenLogprob(t, -1.0) for t in tokens)), 101.0)
    follower = Follower(request, _Detokenizer(), (EOS,), num_received)
    chunks = [follower.next_chunk(200.0)]
    while chunks[-1].finish_reason is None:
        chunks.append(follower.next_chunk(200.0))
    return chunks


CASES = [
    ("plain", "Hello world", SamplingParams(max_tokens=11), "length"),
    ("stop string", "one two STOP three", SamplingParams(max_tokens=18, stop=("STOP",)), "length"),
    ("held back, no match", "a ST b STx", SamplingParams(max_tokens=9, stop=("STOP",)), "length"),
    ("split characters", "café é bé", SamplingParams(max_tokens=20), "length"),
    ("stop inside min_tokens", "ab!cd!ef", SamplingParams(max_tokens=8, stop=("!",), min_tokens=3), "length"),
]


@pytest.mark.parametrize("name, text, params, finish", CASES, ids=[c[0] for c in CASES])
def test_reattaching_after_any_chunk_gives_exactly_the_rest(name, text, params, finish):
    tokens = tokens_of(text)
    whole = uninterrupted(tokens, params, finish)
    sent_tokens = [t for c in whole for t in c.token_ids]
    full_text = "".join(c.text for c in whole)
    received_tokens, received_text = 0, ""
    for chunk in whole[:-1]:                          # the client has every chunk up to this one
        received_tokens += len(chunk.token_ids)
        received_text += chunk.text
        rest = reattached(tokens, params, finish, received_tokens)
        assert [t for c in rest for t in c.token_ids] == sent_tokens[received_tokens:]
        assert received_text + "".join(c.text for c in rest) == full_text
        assert rest[-1].finish_reason == whole[-1].finish_reason
        assert rest[-1].usage.completion_tokens == len(sent_tokens)
        assert [lp.token_id for c in rest for lp in c.logprobs] == sent_tokens[received_tokens:]


def test_a_stop_string_ends_the_stream_and_eos_gives_no_text():
    whole = uninterrupted(tokens_of("one two STOP three"), SamplingParams(max_tokens=18, stop=("STOP",)), "length")
    assert "".join(c.text for c in whole) == "one two " and whole[-1].finish_reason == "stop"
    tokens = tokens_of("hi") + [EOS]
    whole = uninterrupted(tokens, SamplingParams(max_tokens=5), "stop")
    assert "".join(c.text for c in whole) == "hi" and [t for c in whole for t in c.token_ids] == tokens


def test_the_usage_counts_from_the_first_arrival():
    chunks = reattached(tokens_of("abc"), SamplingParams(max_tokens=3), "length", 1)
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (1, 3)
    assert (usage.ttft_ms, usage.e2e_ms) == (1000.0, 100_000.0)     # first token at 101 s, now 200 s, arrival 100 s
