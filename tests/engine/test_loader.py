"""Loader: HF checkpoints fuse into the engine's names; the default GGUF converts like transformers reads it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.engine.loader import (
    DEFAULT_MODEL_NAME,
    _unpermute_rows,
    expected_shapes,
    find_default_gguf,
    load_engine_weights,
    load_hf_state_dict,
    resolve_model_dir,
    to_engine_weights,
)
from services.engine.model_config import ModelConfig

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def save_tiny(path: Path, kind: str = "llama", tie: bool = False, max_shard_size: str | None = None) -> torch.nn.Module:
    """A tiny random checkpoint in HF format at `path`; returns the model it was saved from."""
    import transformers

    torch.manual_seed(0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=tie))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tie))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def check_fused(weights: dict[str, torch.Tensor], model: torch.nn.Module, config: ModelConfig) -> None:
    """Every engine tensor equals the HF module's parameters it was fused from."""
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(config)
    inner = model.model
    assert torch.equal(weights["embed"], inner.embed_tokens.weight)
    assert torch.equal(weights["norm"], inner.norm.weight)
    for i, layer in enumerate(inner.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
        assert torch.equal(weights[p + "qkv"], torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert torch.equal(weights[p + "o"], attn.o_proj.weight)
        assert torch.equal(weights[p + "gate_up"], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(weights[p + "down"], mlp.down_proj.weight)
        assert torch.equal(weights[p + "attn_norm"], layer.input_layernorm.weight)
        assert torch.equal(weights[p + "mlp_norm"], layer.post_attention_layernorm.weight)
        if config.has_qkv_bias:
            bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            assert torch.equal(weights[p + "qkv_bias"], bias)


def test_llama_checkpoint_fuses(tmp_path: Path) -> None:
    model = save_tiny(tmp_path)
    config = ModelConfig.from_dir(tmp_path)
    weights = load_engine_weights(tmp_path, config, torch.float32)
    check_fused(weights, model, config)
    assert torch.equal(weights["lm_head"], model.lm_head.weight)
    assert "layers.0.qkv_bias" not in weights


def test_sharded_checkpoint_loads_every_shard(tmp_path: Path) -> None:
    model = save_tiny(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2
    config = ModelConfig.from_dir(tmp_path)
    check_fused(load_engine_weights(tmp_path, config, torch.float32), model, config)


def test_qwen2_checkpoint_has_qkv_bias(tmp_path: Path) -> None:
    model = save_tiny(tmp_path, kind="qwen2")
    config = ModelConfig.from_dir(tmp_path)
    assert config.has_qkv_bias
    weights = load_engine_weights(tmp_path, config, torch.float32)
    check_fused(weights, model, config)
    assert weights["layers.1.qkv_bias"].shape == ((4 + 2 * 2) * 16,)


def test_tied_checkpoint_has_no_lm_head_and_dtype_is_applied(tmp_path: Path) -> None:
    save_tiny(tmp_path, tie=True)
    config = ModelConfig.from_dir(tmp_path)
    assert config.tie_word_embeddings
    weights = load_engine_weights(tmp_path, config, torch.bfloat16)
    assert "lm_head" not in weights
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in weights.values())


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    hf = load_hf_state_dict(tmp_path)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        to_engine_weights(hf, ModelConfig.from_dir(tmp_path), torch.float32)


def test_unprefixed_names_are_accepted(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    hf = {k.removeprefix("model."): v for k, v in load_hf_state_dict(tmp_path).items()}
    weights = to_engine_weights(hf, ModelConfig.from_dir(tmp_path), torch.float32)
    assert weights["embed"].shape == (128, 64)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    for n_head, rows in ((9, 576), (3, 192)):
        w = torch.randn(rows, 8)
        # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        permuted = w.reshape(n_head, 2, rows // n_head // 2, 8).transpose(1, 2).reshape(rows, 8)
        assert not torch.equal(permuted, w)
        assert torch.equal(_unpermute_rows(permuted, n_head), w)


def test_resolve_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_dir(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(str(tmp_path), tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_dir(str(tmp_path / "weights.bin"), tmp_path)


def test_resolve_returns_hf_dir_as_is(tmp_path: Path) -> None:
    save_tiny(tmp_path / "ckpt")
    assert resolve_model_dir(str(tmp_path / "ckpt"), tmp_path / "cache") == tmp_path / "ckpt"


def test_default_model_is_converted_once(default_model_dir: Path, model_cache_dir: Path) -> None:
    assert default_model_dir == model_cache_dir / DEFAULT_MODEL_NAME
    stamp = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir("default", model_cache_dir) == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == stamp   # reused, not rewritten
    assert not [p for p in model_cache_dir.iterdir() if p.name.startswith(".")]     # no tmp dirs left


def test_default_config_matches_gguf_metadata(default_model_dir: Path) -> None:
    config = ModelConfig.from_dir(default_model_dir)
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position) == (49152, 8192)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == pytest.approx(1e-5)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_default_weights_equal_transformers_gguf_loader(default_model_dir: Path) -> None:
    """transformers un-permutes q/k on its own: matching it proves our inverse permutation."""
    from transformers import AutoModelForCausalLM

    gguf_path = find_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    expected = reference.state_dict()
    ours = load_file(str(default_model_dir / "model.safetensors"))
    assert "lm_head.weight" not in ours
    assert set(ours) == set(expected) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    config = ModelConfig.from_dir(default_model_dir)
    check_fused(load_engine_weights(default_model_dir, config, torch.float32), reference, config)


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.engine import loader

    def crash(*args: object) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(loader, "_hf_tensors", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        resolve_model_dir(None, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_publish_replaces_a_stale_conversion(tmp_path: Path) -> None:
    from services.engine.loader import _publish

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("stale")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text("{}")
    _publish(tmp_path / "new", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
