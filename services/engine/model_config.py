"""The shape of a Llama-family model, read from a Hugging Face `config.json`.

Pure Python: the scheduler, the arena and the performance model size things from it without torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary embedding scaling (`rope_scaling` in HF configs); `kind` "default" means none."""

    kind: str = "default"                     # default | linear | llama3
    factor: float = 1.0                       # linear and llama3
    low_freq_factor: float = 1.0              # llama3
    high_freq_factor: float = 4.0             # llama3
    original_max_position: int = 8192         # llama3


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the engine needs to build the model and size the KV cache."""

    architecture: str                         # HF architecture name, for messages and model info
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int                            # query heads
    num_kv_heads: int                         # key/value heads (grouped-query attention)
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int                         # longest context the model was trained for
    tie_word_embeddings: bool                 # lm_head shares the embedding matrix
    has_qkv_bias: bool                        # Qwen2 carries biases on q/k/v
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]            # any of these ends a request unless ignore_eos
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    torch_dtype: str = "float32"              # dtype the checkpoint was saved in

    @property
    def kv_elements_per_token(self) -> int:
        """K and V of every layer for one token, in elements (multiply by the dtype's size for bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            has_qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=_rope_scaling(cfg),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """config.json, with the extra eos ids of generation_config.json (Llama 3 lists several there)."""
        config = cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))
        eos = tuple(dict.fromkeys((*config.eos_token_ids, *generation_eos_ids(Path(path)))))
        return replace(config, eos_token_ids=eos)


def generation_eos_ids(path: Path) -> list[int]:
    """eos ids from a checkpoint's generation_config.json; none when absent."""
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]


def _rope_scaling(cfg: dict[str, Any]) -> RopeScaling:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    if not rs:
        return RopeScaling()
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")
    return RopeScaling(
        kind=kind,
        factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
    )
