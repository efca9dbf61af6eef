"""Every supported Llama-family variant matches transformers: tiny random checkpoints written in HF format.

Covers what the default model does not: Llama 3 rope scaling, linear rope scaling, Qwen2's q/k/v
bias, Mistral, untied embeddings, multi-query attention, and the bf16/fp16 paths.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine.blocks import BlockManager
from services.engine.kv_cache import KVCacheSpec, allocate_kv_pool
from services.engine.loader import load_engine_weights
from services.engine.model import LlamaModel
from services.engine.model_config import ModelConfig
from services.engine.runner import ModelRunner
from services.engine.scheduler import ScheduledChunk, SchedulerOutput

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=512)


def _variants():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    return {
        "llama3-rope": LlamaConfig(**COMMON, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "llama-linear-rope": LlamaConfig(**COMMON, num_key_value_heads=4, tie_word_embeddings=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "llama-mqa": LlamaConfig(**COMMON, num_key_value_heads=1, tie_word_embeddings=False),
        "qwen2-bias": Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=False),
        "mistral": MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False),
    }


def _save(name: str, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(hash(name) % 1000)
    model = AutoModelForCausalLM.from_config(_variants()[name])
    out = tmp_path / name
    model.save_pretrained(out)
    return out


def _greedy_ours(model_dir: Path, prompt: list[int], num_tokens: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    config = ModelConfig.from_dir(model_dir)
    spec = KVCacheSpec.for_model(config, 16, dtype, num_blocks=16)
    runner = ModelRunner(LlamaModel(config, load_engine_weights(model_dir, config, dtype)), allocate_kv_pool(spec), 16)
    blocks = BlockManager(16)
    table = tuple(blocks.allocate("r", 8))
    tokens, first_logits, ctx = [], None, list(prompt)
    chunk = ScheduledChunk("r", tuple(prompt), 0, table, True)
    for _ in range(num_tokens):
        logits = runner.run(SchedulerOutput((chunk,), ()) if chunk.start_position == 0 else SchedulerOutput((), (chunk,)))
        first_logits = logits[0] if first_logits is None else first_logits
        token = int(logits[0].argmax())
        tokens.append(token)
        chunk = ScheduledChunk("r", (token,), len(ctx), table, True)
        ctx.append(token)
    return tokens, first_logits


def _greedy_hf(model_dir: Path, prompt: list[int], num_tokens: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    from transformers import AutoModelForCausalLM, DynamicCache
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokens, cache, ids, first_logits = [], DynamicCache(), torch.tensor([prompt]), None
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1].float()
            first_logits = logits if first_logits is None else first_logits
            ids = logits.argmax().view(1, 1)
            tokens.append(int(ids))
    return tokens, first_logits


@pytest.mark.parametrize("name", ["llama3-rope", "llama-linear-rope", "llama-mqa", "qwen2-bias", "mistral"])
def test_variant_matches_transformers(name: str, tmp_path: Path) -> None:
    model_dir = _save(name, tmp_path)
    prompt = list(range(3, 40))       # 37 tokens: crosses a block boundary; decode crosses another
    ours, our_logits = _greedy_ours(model_dir, prompt, 12, torch.float32)
    ref, ref_logits = _greedy_hf(model_dir, prompt, 12, torch.float32)
    assert ((our_logits - ref_logits).abs().max() / ref_logits.abs().max()) < 1e-4
    assert ours == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_stays_close(dtype: torch.dtype, tmp_path: Path) -> None:
    model_dir = _save("llama3-rope", tmp_path)
    prompt = list(range(3, 30))
    _, ours = _greedy_ours(model_dir, prompt, 1, dtype)
    _, ref = _greedy_ours(model_dir, prompt, 1, torch.float32)
    assert torch.isfinite(ours).all()
    assert ((ours - ref).abs().max() / ref.abs().max()) < 5e-2
