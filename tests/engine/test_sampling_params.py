"""SamplingParams validation: every out-of-range field raises InvalidSamplingParams naming it."""
from __future__ import annotations

import math

import pytest

from services.engine.sampling_params import MAX_LOGPROBS, InvalidSamplingParams, SamplingParams


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", -2.5), ("presence_penalty", 2.01), ("presence_penalty", math.nan),
    ("frequency_penalty", -2.01), ("frequency_penalty", 3.0), ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("min_tokens", -1), ("min_tokens", 17),                       # max_tokens is 16 by default
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1),
])
def test_out_of_range_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


@pytest.mark.parametrize("kwargs", [
    dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
    dict(frequency_penalty=2.0), dict(repetition_penalty=0.01), dict(repetition_penalty=10.0),
    dict(min_tokens=0), dict(min_tokens=16), dict(max_tokens=100, min_tokens=100),
    dict(logprobs=None), dict(logprobs=0), dict(logprobs=MAX_LOGPROBS),
])
def test_in_range_fields_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_defaults_do_nothing() -> None:
    params = SamplingParams()
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.min_tokens == 0 and params.logprobs is None
    assert not params.has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.1).has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
