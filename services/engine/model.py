"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) as one readable forward pass over a paged KV cache.

The model owns no memory: its weights (fused, canonical names; see `loader.to_engine_weights`) and
the KV pool are handed in, so the same code runs over private tensors, over POSIX shared memory
mapped by two worker processes, or over CUDA IPC handles. The batch is flat: T tokens from several
requests, described by `AttentionMetadata`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from services.engine.attention import AttentionMetadata, paged_attention, write_kv
from services.engine.model_config import ModelConfig, RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Rotary inverse frequencies [D/2], with linear or Llama-3 scaling applied as Hugging Face does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, the band between blended.
    old_len = scaling.original_max_position
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x [T, heads, D]; cos, sin [T, 1, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaModel:
    """Forward pass of a Llama-family decoder. Stateless between calls: all state is in the KV pool."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.config = config
        self.weights = weights
        self.dtype = weights["embed"].dtype
        self.scale = config.head_dim ** -0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.lm_head = weights["embed"] if config.tie_word_embeddings else weights["lm_head"]
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.outer(torch.arange(config.max_position, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.rope_cos, self.rope_sin = freqs.cos(), freqs.sin()
        self.layers = [_LayerWeights.take(weights, i) for i in range(config.num_layers)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T]; kv_cache [L, 2, N, block_size, Hkv, D]. -> final hidden states [T, hidden]."""
        cfg = self.config
        x = F.embedding(input_ids, self.weights["embed"])                    # [T, hidden]
        cos = self.rope_cos[positions].unsqueeze(1).to(self.dtype)            # [T, 1, D/2]
        sin = self.rope_sin[positions].unsqueeze(1).to(self.dtype)
        num_tokens = input_ids.shape[0]
        for layer, w in enumerate(self.layers):
            h = F.rms_norm(x, (cfg.hidden_size,), w.attn_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias)                              # [T, (H + 2 Hkv) D]
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = apply_rope(q.view(num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)      # [T, H, D]
            k = apply_rope(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)   # [T, Hkv, D]
            v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]        # [N, bs, Hkv, D]
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            attn = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
            x = x + F.linear(attn.reshape(num_tokens, self.q_size), w.o)
            h = F.rms_norm(x, (cfg.hidden_size,), w.mlp_norm, cfg.rms_norm_eps)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)                # [T, I] each
            x = x + F.linear(F.silu(gate) * up, w.down)
        return F.rms_norm(x, (cfg.hidden_size,), self.weights["norm"], cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (only the rows that sample) -> logits [S, V] in float32."""
        return F.linear(hidden, self.lm_head).float()


class _LayerWeights:
    """One decoder layer's tensors, looked up once so the forward pass does no string formatting."""

    __slots__ = ("attn_norm", "qkv", "qkv_bias", "o", "mlp_norm", "gate_up", "down")

    @classmethod
    def take(cls, weights: dict[str, torch.Tensor], i: int) -> "_LayerWeights":
        layer = cls()
        prefix = f"layers.{i}."
        for name in cls.__slots__:
            setattr(layer, name, weights.get(prefix + name))
        return layer
