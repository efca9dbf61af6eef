"""Penalties, min_tokens and logprobs through the split stack: prefill samples the first token and
decode the rest, through the same sampler, so the stream must equal the offline engine's."""
from __future__ import annotations

import pytest

import duoserve
from services.engine.llm_engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["Write a haiku about the sea.", "List three primary colors."]
PENALIZED = dict(max_tokens=24, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=3)
SHORT_ANSWER = "What is 2+2? Answer with a number only."      # greedy ends (EOS) after a few tokens


@pytest.fixture(scope="module")
def offline_engine(default_model_dir):
    return LLMEngine.from_config(EngineConfig(model=str(default_model_dir), num_kv_blocks=128))


def _chat(engine: LLMEngine, prompt: str) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


def test_penalized_greedy_with_logprobs_equals_the_offline_engine(split_stack, offline_engine):
    expected = offline_engine.generate([_chat(offline_engine, p) for p in PROMPTS], SamplingParams(**PENALIZED))
    with duoserve.Client(split_stack.target, timeout=120) as client:
        for prompt, want in zip(PROMPTS, expected):
            with client.stream(messages=[{"role": "user", "content": prompt}], **PENALIZED) as stream:
                chunks = list(stream)
            assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
            tokens = [t for c in chunks for t in c.token_ids]
            got = [lp for c in chunks for lp in c.logprobs]
            assert tokens == list(want.token_ids)
            assert len(got) == len(want.logprobs) == len(tokens)     # the first one (prefill's) included
            for g, w in zip(got, want.logprobs):
                assert g.token_id == w.token_id
                assert g.logprob == pytest.approx(w.logprob, abs=1e-3)
                assert len(g.top) == len(w.top) == 3
                assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-3)
                values = [v for _, v in w.top]
                if all(a - b > 2e-3 for a, b in zip(values, values[1:])):    # no near-ties to reorder
                    assert [t for t, _ in g.top] == [t for t, _ in w.top]


def test_min_tokens_keeps_a_short_answer_going(split_stack):
    with duoserve.Client(split_stack.target, timeout=120) as client:
        messages = [{"role": "user", "content": SHORT_ANSWER}]
        natural = client.generate(messages=messages, max_tokens=32, temperature=0)
        assert natural.finish_reason == "stop" and len(natural.token_ids) < 12
        longer = client.generate(messages=messages, max_tokens=32, temperature=0,
                                 min_tokens=len(natural.token_ids) + 6)
        assert len(longer.token_ids) >= len(natural.token_ids) + 6
        assert list(longer.token_ids[:len(natural.token_ids) - 1]) == list(natural.token_ids[:-1])
