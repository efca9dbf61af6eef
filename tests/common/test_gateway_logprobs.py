"""The gateway's side of the new sampling fields and logprobs: protobuf conversions both ways, and
chunks whose logprobs stay parallel to their tokens when a stop string ends a delivery early."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

from duoserve.v1 import generation_pb2 as pb
from services.common.contracts import TokenDelivery, TokenLogprob
from services.engine.sampling_params import SamplingParams
from services.gateway.config import GatewayConfig
from services.gateway.errors import InvalidInput
from services.gateway.frontend import Chunk, Frontend
from services.gateway.inflight import RequestRecord
from services.gateway.request_ids import RequestIds
from services.gateway.servicer import to_response, to_sampling_params
from tests.common.char_detokenizer import CharDetokenizer


def test_new_sampling_fields_convert_and_unset_ones_take_the_defaults():
    sp = to_sampling_params(pb.SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.3,
                                              min_tokens=4, logprobs=0, max_tokens=8), default_max_tokens=16)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -1.0, 1.3)
    assert (sp.min_tokens, sp.logprobs) == (4, 0)
    default = to_sampling_params(pb.SamplingParams(), default_max_tokens=16)
    assert default == SamplingParams(max_tokens=16)


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0), ("min_tokens", 99), ("logprobs", 21)])
def test_out_of_range_fields_are_invalid_input_naming_them(field, value):
    with pytest.raises(InvalidInput, match=f"^{field}:"):
        to_sampling_params(pb.SamplingParams(**{field: value}), default_max_tokens=16)


def test_chunk_logprobs_go_into_the_response():
    chunk = Chunk("r", (5, 6), "ab", logprobs=(TokenLogprob(5, -0.5, ((5, -0.5), (7, -1.5))), TokenLogprob(6, -2.0)))
    response = to_response(chunk)
    assert [(lp.token_id, lp.logprob) for lp in response.logprobs] == [(5, -0.5), (6, -2.0)]
    assert [(t.token_id, t.logprob) for t in response.logprobs[0].top] == [(5, -0.5), (7, -1.5)]
    assert not response.logprobs[1].top
    assert not to_response(Chunk("r", (5,), "a")).logprobs


class _FakeRedis:
    async def xadd(self, *args, **kwargs) -> None:
        pass

    async def hdel(self, *args, **kwargs) -> None:
        pass


def test_a_stop_string_inside_a_delivery_cuts_its_logprobs_with_its_tokens():
    frontend = Frontend(GatewayConfig(redis_url="redis://unused", key_prefix="t", port=0, gateway_id="gw"), _FakeRedis(), MagicMock())
    frontend.tokenizer = SimpleNamespace(detokenizer=lambda prompt: CharDetokenizer())
    frontend.info = SimpleNamespace(eos_token_ids=(0,))
    params = SamplingParams(stop=("XY",), logprobs=1)
    text = "abXYcd"
    logprobs = tuple(TokenLogprob(ord(c), -float(i), ((ord(c), -float(i)),)) for i, c in enumerate(text))

    async def run() -> list[Chunk]:
        request = frontend._track(RequestRecord("r", "r", False, (1,), 1, params, 0.0, "0-0"), RequestIds("r", "r", None))
        chunks = []
        request.add(TokenDelivery("r", (ord("a"),), logprobs=logprobs[:1], position=0), 1.0)
        async for chunk in frontend._follow(request, 0):
            chunks.append(chunk)
            if len(chunks) == 1:
                request.add(TokenDelivery("r", tuple(map(ord, text[1:])), logprobs=logprobs[1:], position=1), 2.0)
        return chunks

    chunks = asyncio.run(run())
    assert [c.token_ids for c in chunks] == [(ord("a"),), tuple(map(ord, "bXY"))]
    assert [c.logprobs for c in chunks] == [logprobs[:1], logprobs[1:4]]
    assert chunks[-1].finish_reason == "stop" and "".join(c.text for c in chunks) == "ab"
