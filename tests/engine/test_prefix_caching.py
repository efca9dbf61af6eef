"""Prefix caching on the real default model: a cached prefix gives the same greedy tokens and logprobs
as computing it, and only the uncached tail is prefilled."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from services.engine.llm_engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, logprobs=1)


@pytest.fixture(scope="module")
def engines(default_model_dir: Path) -> tuple[LLMEngine, LLMEngine]:
    config = EngineConfig(model=str(default_model_dir), num_kv_blocks=96, max_num_batched_tokens=256, chunk_size=256)
    return (LLMEngine.from_config(config),
            LLMEngine.from_config(replace(config, prefix_caching=False)))


def _history(engine: LLMEngine, turns: int) -> list[int]:
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: name a city in country number {i}."},
                     {"role": "assistant", "content": f"City {i} is a fine answer to question {i}."}]
    return engine.tokenizer.apply_chat_template(messages + [{"role": "user", "content": "And one more?"}])


def test_the_same_prompt_twice_gives_the_same_tokens_and_prefills_only_the_tail(engines):
    cached, plain = engines
    prompt = _history(cached, 6)
    first = cached.generate([prompt], GREEDY)[0]
    hits_before = cached.scheduler.prefix_hit_tokens
    second = cached.generate([prompt], GREEDY)[0]
    hit = cached.scheduler.prefix_hit_tokens - hits_before
    reference = plain.generate([prompt], GREEDY)[0]
    assert first.token_ids == second.token_ids == reference.token_ids
    assert len(prompt) - 16 <= hit < len(prompt)                             # all but the last block's tail
    for a, b in zip(second.logprobs, reference.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-3
    assert plain.scheduler.prefix_hit_tokens == 0


def test_a_longer_conversation_reuses_the_shorter_ones_prefix_and_matches(engines):
    cached, plain = engines
    short, long_ = _history(cached, 3), _history(cached, 5)
    cached.generate([short], GREEDY)
    hits_before = cached.scheduler.prefix_hit_tokens
    got = cached.generate([long_], GREEDY)[0]
    assert cached.scheduler.prefix_hit_tokens - hits_before >= 16            # the shared turns' blocks
    assert got.token_ids == plain.generate([long_], GREEDY)[0].token_ids


def test_concurrent_requests_with_a_shared_prefix_under_eviction_pressure(engines):
    cached, plain = engines
    prompts = [_history(cached, 2 + i % 4) for i in range(10)]               # more KV than 96 blocks hold at once
    assert [o.token_ids for o in cached.generate(prompts, GREEDY)] == \
        [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert cached.scheduler.blocks.num_free == cached.scheduler.blocks.num_blocks


def test_copies_of_one_prompt_compute_it_once_and_match(engines):
    """n > 1 in the offline engine: three copies sent at once; the two after the first reuse its blocks."""
    cached, plain = engines
    prompt = _history(cached, 4)[:-3] + [cached.tokenizer.encode(" copies")[0]] * 3   # not cached by other tests
    hits_before = cached.scheduler.prefix_hit_tokens
    got = cached.generate([prompt] * 3, GREEDY)
    assert cached.scheduler.prefix_hit_tokens - hits_before >= 2 * (len(prompt) - 16)
    assert [o.token_ids for o in got] == [plain.generate([prompt], GREEDY)[0].token_ids] * 3
