"""to_json/from_json round trips of the messages that carry sampling parameters and logprobs."""
from __future__ import annotations

import json

from services.common.contracts import (Handoff, QueuedRequest, TokenDeliveries, TokenDelivery, TokenLogprob,
                                       deliveries_from_json, from_json, to_json)
from services.engine.sampling_params import SamplingParams

EVERY_FIELD = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, top_k=12, seed=5, stop=("###", "\n\n"),
                             stop_token_ids=(3, 4), ignore_eos=True, presence_penalty=-0.5,
                             frequency_penalty=1.25, repetition_penalty=1.3, min_tokens=7, logprobs=0)


def test_queued_request_and_handoff_keep_every_sampling_field() -> None:
    queued = QueuedRequest("r1", (1, 2, 3), EVERY_FIELD, "duo:reply:g", 12.5, (9,))
    assert from_json(QueuedRequest, to_json(queued)) == queued
    handoff = Handoff("r1", (4, 5), (1, 2, 3), (9,), 3, EVERY_FIELD, "duo:reply:g", 12.5, 13.0)
    assert from_json(Handoff, to_json(handoff)) == handoff
    assert from_json(Handoff, to_json(handoff)).sampling.logprobs == 0      # 0 is not "unset"


def test_a_handoff_written_before_kv_memory_reads_as_unknown_memory() -> None:
    handoff = Handoff("r1", (4,), (1, 2, 3), (9,), 3, SamplingParams(max_tokens=3), "s", 1.0, 2.0, kv_memory="ab12")
    assert from_json(Handoff, to_json(handoff)) == handoff
    data = json.loads(to_json(handoff))
    del data["kv_memory"]
    assert from_json(Handoff, json.dumps(data)).kv_memory == ""          # trusted as before (Worker._kv_elsewhere)


def test_sampling_written_before_the_new_fields_reads_with_their_defaults() -> None:
    data = json.loads(to_json(QueuedRequest("r1", (1,), SamplingParams(max_tokens=3), "s", 1.0)))
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs"):
        del data["sampling"][name]
    assert from_json(QueuedRequest, json.dumps(data)).sampling == SamplingParams(max_tokens=3)


def test_delivery_logprobs_round_trip() -> None:
    logprobs = (TokenLogprob(11, -0.25, ((11, -0.25), (12, -1.5), (3, -float("inf")))), TokenLogprob(12, -2.0))
    delivery = TokenDelivery("r1", (11, 12), None, logprobs=logprobs)
    back = from_json(TokenDelivery, to_json(delivery))
    assert back == delivery
    assert isinstance(back.logprobs[0].top[0], tuple)
    batch = TokenDeliveries((delivery, TokenDelivery("r2", (5,), "stop")))
    assert deliveries_from_json(to_json(batch)) == batch.deliveries


def test_empty_logprobs_stay_out_of_the_json() -> None:
    text = to_json(TokenDelivery("r1", (11,), None))
    assert "logprobs" not in text
    assert from_json(TokenDelivery, text).logprobs == ()
    text = to_json(TokenDelivery("r1", (11,), None, logprobs=(TokenLogprob(11, -0.5),)))
    assert json.loads(text)["logprobs"] == [{"token_id": 11, "logprob": -0.5}]     # logprobs=0: no "top"
    # SamplingParams.logprobs is not a tuple: None and 0 are both written
    assert json.loads(to_json(SamplingParams()))["logprobs"] is None
    assert json.loads(to_json(SamplingParams(logprobs=0)))["logprobs"] == 0


def test_a_delivery_after_what_the_gateway_already_sent() -> None:
    lp = (TokenLogprob(5, -0.1), TokenLogprob(6, -0.2), TokenLogprob(7, -0.3))
    delivery = TokenDelivery("r", (5, 6, 7), logprobs=lp, position=4)
    assert delivery.after(4) is delivery and delivery.after(2) is delivery      # nothing sent twice
    again = delivery.after(6)                                                   # 4 and 5 were sent already
    assert again.token_ids == (7,) and again.logprobs == lp[2:] and again.position == 6
    assert delivery.after(9).token_ids == ()
    unplaced = TokenDelivery("r", (5,))                                         # from an older worker
    assert unplaced.after(100) is unplaced
    assert from_json(TokenDelivery, to_json(delivery)) == delivery
