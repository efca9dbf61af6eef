"""The engine on the real default model matches `transformers` token for token (greedy) and in logits."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine.llm_engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence why the sky is blue.",
]
RAW_PROMPTS = ["The quick brown fox", "def fibonacci(n):"]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def engine(default_model_dir: Path) -> LLMEngine:
    # A small pool and budget on purpose: the batch below needs several iterations of chunks.
    return LLMEngine.from_config(EngineConfig(model=str(default_model_dir), num_kv_blocks=128,
                                              max_num_batched_tokens=64, chunk_size=48))


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def _prompts(engine: LLMEngine) -> list[list[int]]:
    tok = engine.tokenizer
    return ([tok.apply_chat_template([{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
            + [tok.encode(p) for p in RAW_PROMPTS])


def _hf_greedy(hf_model, prompt: list[int], num_tokens: int) -> list[int]:
    """Plain argmax with transformers' own KV cache: no logits processors (generate's min_new_tokens
    would mask EOS, which is not what ignore_eos means)."""
    from transformers import DynamicCache
    tokens, cache, ids = [], DynamicCache(), torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(num_tokens):
            out = hf_model(ids, past_key_values=cache, use_cache=True)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(ids))
    return tokens


def test_greedy_tokens_identical_to_transformers(engine, hf_model):
    prompts = _prompts(engine)
    # All six together: batching, chunked prefill and decode rows beside prefill must not change a token.
    outputs = engine.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        assert list(out.token_ids) == _hf_greedy(hf_model, prompt, NUM_TOKENS)
    assert engine.scheduler.blocks.num_free == engine.scheduler.blocks.num_blocks


def test_last_position_logits_match_within_1e3_relative(engine, hf_model):
    from services.engine.scheduler import ScheduledChunk, SchedulerOutput
    blocks = engine.scheduler.blocks
    for i, prompt in enumerate(_prompts(engine)):
        table = blocks.allocate(f"logits-{i}", -(-len(prompt) // 16))
        batch = SchedulerOutput((ScheduledChunk(f"logits-{i}", tuple(prompt), 0, tuple(table), True),), ())
        ours = engine.runner.run(batch)[0]
        blocks.free(f"logits-{i}")
        with torch.inference_mode():
            ref = hf_model(torch.tensor([prompt])).logits[0, -1].float()
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-3, f"prompt {i}: max relative logit error {rel:.2e}"


def test_default_model_answers_paris(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in out.text


def test_stop_string_cuts_text_exactly(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    full = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].text
    assert " is " in full
    cut = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, stop=(" is ",)))[0]
    assert cut.text == full[: full.index(" is ")]
    assert cut.finish_reason.value == "stop"


def test_seeded_sampling_reproducible_through_the_engine(engine):
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    alone = engine.generate([prompt], params)[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.0)
    batched = engine.generate([prompt, prompt, prompt], [others, params, others])[1].token_ids
    assert alone == batched
