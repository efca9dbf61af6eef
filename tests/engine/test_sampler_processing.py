"""The sampler's logits processing and logprobs: penalties, min_tokens, raw logprobs (vLLM's semantics)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from services.engine.sampler import Sampler, SamplingRow
from services.engine.sampling_params import SamplingParams

VOCAB = 64
EOS = 7


def reference_penalties(row: torch.Tensor, prompt: list[int], output: list[int], presence: float,
                        frequency: float, repetition: float) -> torch.Tensor:
    """vLLM's apply_penalties, one token at a time: repetition over prompt and output tokens
    (positive logits divided, others multiplied), then frequency per occurrence and presence once,
    over the output tokens only."""
    x = row.clone().float()
    for token in set(prompt) | set(output):
        x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    for token, count in Counter(output).items():
        x[token] -= frequency * count
        x[token] -= presence
    return x


def make_logits(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VOCAB, generator=gen) * 3          # [B, V]; both signs, so both repetition rules


PENALTIES = [dict(repetition_penalty=1.5), dict(repetition_penalty=0.5), dict(frequency_penalty=0.5),
             dict(frequency_penalty=-1.25), dict(presence_penalty=2.0), dict(presence_penalty=-0.75),
             dict(repetition_penalty=1.25, frequency_penalty=0.5, presence_penalty=0.25)]


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_penalties_match_a_reference(penalty: dict, temperature: float) -> None:
    logits = make_logits(16, seed=1)
    prompts = [[(3 * i + j) % VOCAB for j in range(5)] for i in range(16)]
    outputs = [[(5 * i + j * j) % VOCAB for j in range(i % 7)] for i in range(16)]
    params = SamplingParams(temperature=temperature, seed=4, **penalty)
    rows = [SamplingRow(params, len(o), p, o) for p, o in zip(prompts, outputs)]
    got = Sampler()(logits, rows)
    # The same draw on the reference's penalized logits, with the penalties off.
    plain = replace(params, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    reference = torch.stack([reference_penalties(logits[i], prompts[i], outputs[i], params.presence_penalty,
                                                 params.frequency_penalty, params.repetition_penalty)
                             for i in range(16)])
    expected = Sampler()(reference, [SamplingRow(plain, len(o)) for o in outputs])
    assert got == expected
    if temperature == 0.0:
        assert got == reference.argmax(dim=1).tolist()


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11] = 2.0, 1.5
    greedy = SamplingParams(temperature=0.0)
    assert Sampler()(logits, [SamplingRow(greedy, 1, (), (10,))]) == [10]
    for penalty in (dict(repetition_penalty=1.5), dict(frequency_penalty=1.0), dict(presence_penalty=1.0)):
        row = SamplingRow(replace(greedy, **penalty), 1, (), (10,))
        assert Sampler()(logits, [row]) == [11], penalty
    # repetition_penalty also reads the prompt; frequency and presence do not
    assert Sampler()(logits, [SamplingRow(replace(greedy, repetition_penalty=1.5), 0, (10,), ())]) == [11]
    assert Sampler()(logits, [SamplingRow(replace(greedy, frequency_penalty=2.0), 0, (10,), ())]) == [10]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 20], logits[0, 30] = 5.0, 4.0, 3.0          # EOS, then a stop id, then text
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(20,), max_tokens=8)
    for generated in range(5):
        output = tuple(range(40, 40 + generated))
        token = Sampler()(logits, [SamplingRow(params, generated, (1, 2), output, (EOS,))])[0]
        assert token == (30 if generated < 3 else EOS), generated
    # ignore_eos: EOS ends nothing, so it stays allowed; stop ids are still masked
    ignore = replace(params, ignore_eos=True)
    assert Sampler()(logits, [SamplingRow(ignore, 0, (1,), (), (EOS,))]) == [EOS]
    logits[0, EOS] = 0.0
    assert Sampler()(logits, [SamplingRow(ignore, 0, (1,), (), (EOS,))]) == [30]


def test_min_tokens_holds_for_sampled_rows() -> None:
    logits = torch.zeros(64, VOCAB)
    logits[:, EOS] = 4.0                                                  # EOS most likely, everything possible
    params = SamplingParams(temperature=1.5, min_tokens=2, max_tokens=4)
    rows = [SamplingRow(replace(params, seed=i), 1, (1,), (2,), (EOS,)) for i in range(64)]
    assert EOS not in Sampler()(logits, rows)
    rows = [SamplingRow(replace(params, seed=i), 2, (1,), (2, 3), (EOS,)) for i in range(64)]
    assert EOS in Sampler()(logits, rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_the_raw_log_softmax_with_sorted_alternatives(dtype: torch.dtype) -> None:
    logits = make_logits(6, seed=2).to(dtype)
    kinds = [SamplingParams(temperature=0.0, logprobs=3),
             SamplingParams(temperature=0.7, top_k=5, seed=1, logprobs=20),
             SamplingParams(temperature=1.3, top_p=0.5, repetition_penalty=1.4, frequency_penalty=1.0,
                            seed=2, logprobs=1),
             SamplingParams(temperature=0.0, logprobs=0),
             SamplingParams(temperature=0.0),
             SamplingParams(temperature=0.9, seed=3, min_tokens=4, max_tokens=8, logprobs=2)]
    rows = [SamplingRow(p, 1, (1, 2, 3), (4,), (EOS,)) for p in kinds]
    before = logits.clone()
    out = Sampler().sample(logits, rows)
    assert torch.equal(logits, before)                                    # the caller's logits untouched
    expected = torch.log_softmax(logits.float(), dim=1)                   # raw: before any processing
    for i, (params, token, lp) in enumerate(zip(kinds, out.token_ids, out.logprobs)):
        if params.logprobs is None:
            assert lp is None
            continue
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(expected[i, token].item(), abs=1e-6)
        assert len(lp.top) == params.logprobs
        ids = [t for t, _ in lp.top]
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert ids == torch.topk(expected[i], params.logprobs).indices.tolist()
        assert values == pytest.approx(expected[i, ids].tolist(), abs=1e-6)
        assert all(math.isfinite(v) for v in values)


def test_rows_without_processing_are_unchanged_beside_rows_with_it() -> None:
    logits = make_logits(12, seed=3)
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=5),
             SamplingParams(top_p=0.9, seed=6), SamplingParams(top_k=4, temperature=1.1, seed=7)] * 3
    alone = Sampler()(logits, [SamplingRow(p, 2) for p in plain])
    rows = [SamplingRow(p, 2) for p in plain]
    special = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0, min_tokens=5,
                             max_tokens=9, logprobs=4)
    for i in (0, 5, 11):
        rows[i] = SamplingRow(special, 2, (1, 2), (3, 4), (EOS,))
    mixed = Sampler().sample(logits, rows)
    for i in range(12):
        if i not in (0, 5, 11):
            assert mixed.token_ids[i] == alone[i]
            assert mixed.logprobs[i] is None
    assert all(mixed.logprobs[i] is not None for i in (0, 5, 11))


def test_a_row_with_min_tokens_reached_and_no_penalty_is_plain() -> None:
    params = SamplingParams(min_tokens=2, max_tokens=4)
    assert SamplingRow(params, 1).is_processed
    assert not SamplingRow(params, 2).is_processed
    assert not SamplingRow(SamplingParams(logprobs=5), 0).is_processed
    assert SamplingRow(SamplingParams(presence_penalty=0.1), 0).is_processed
