"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) as one readable forward pass over a paged KV cache.

The model owns no memory but one: its weights (fused, canonical names; see `loader.to_engine_weights`)
and the KV pool are handed in, so the same code runs over private tensors, over POSIX shared memory
mapped by two worker processes, or over CUDA IPC handles. One exception, on CPU: weights this
process owns are reordered once into oneDNN's layout (`Linear`: ~1.5-2x faster GEMMs) and the
originals dropped; weights viewed from a shared segment are used as they are unless the caller
asks for packing (a private copy of every linear weight in each process that does).
The batch is flat: T tokens from several requests, described by `AttentionMetadata`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from services.engine.attention import AttentionMetadata
from services.engine.kernels import kernels_for
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


class Linear:
    """y = x W^T (+ b). Packed: the weight reordered once into oneDNN's blocked layout, which runs
    float32 GEMMs faster than F.linear's MKL path (1.5-2x on AMD Zen 4, where MKL takes slow paths;
    ~1.15x on an AVX-512 Xeon with the weights streamed from memory, most at decode sizes) and skips
    the reorder oneDNN otherwise repeats on every bf16 call. Same fp32 arithmetic: results differ
    from F.linear only in summation order."""

    __slots__ = ("weight", "bias", "packed")

    PACK_FOR_ROWS = 512     # oneDNN picks the blocking for this many rows; measured best for 1 to 2048

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_FOR_ROWS) if pack else None
        self.weight = None if pack else weight          # not kept when packed: private weights can be freed
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T (+ b), the add fused into the GEMM when packed."""
        if self.packed is None:
            return residual + F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing pays on CPU for float32, and for bfloat16 where the CPU has bf16 instructions."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (
        weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def owns_storage(weights: dict[str, torch.Tensor]) -> bool:
    """True when every tensor has a storage of its own (a private load), False when they are views
    into a larger buffer (the arena's shared segment: packing would copy it into each process)."""
    return all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in weights.values())


class LlamaModel:
    """Forward pass of a Llama-family decoder. Stateless between calls: all state is in the KV pool."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], pack_weights: bool | None = None) -> None:
        """pack_weights: reorder the linear weights into oneDNN copies (see `Linear`) or run F.linear
        over the given tensors; None packs exactly when the weights are this process's own."""
        self.config = config
        self.embed, self.norm = weights["embed"], weights["norm"]
        self.dtype = self.embed.dtype
        self.scale = config.head_dim ** -0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        pack = (owns_storage(weights) if pack_weights is None else pack_weights) and can_pack(self.embed)
        self.lm_head = Linear(weights["embed"] if config.tie_word_embeddings else weights["lm_head"], None, pack)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.outer(torch.arange(config.max_position, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.rope_cos, self.rope_sin = freqs.cos().to(self.embed.device), freqs.sin().to(self.embed.device)
        self.layers = [_Layer.take(weights, i, pack) for i in range(config.num_layers)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T]; kv_cache [L, 2, N, Hkv, block_size, D]. -> final hidden states [T, hidden]."""
        cfg = self.config
        num_tokens, num_heads = input_ids.shape[0], cfg.num_heads
        ops = kernels_for(kv_cache.device)       # torch ops; C++ kernels on CPU, Triton on CUDA (kernels.py)
        eps = cfg.rms_norm_eps
        x = F.embedding(input_ids, self.embed)                                    # [T, hidden]
        rope = ops.rope_tables(self.rope_cos[positions].to(self.dtype), self.rope_sin[positions].to(self.dtype))
        for layer, w in enumerate(self.layers):
            qkv = w.qkv(ops.rms_norm(x, w.attn_norm, eps))                       # [T, (H + 2 Hkv) D]
            # q and k rotate together: [T, H + Hkv, D], then split by head (views).
            qk = ops.apply_rope(qkv[:, :self.q_size + self.kv_size].view(num_tokens, -1, cfg.head_dim), rope)
            q, k = qk[:, :num_heads], qk[:, num_heads:]                          # [T, H, D], [T, Hkv, D]
            v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]            # [N, Hkv, bs, D]
            ops.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
            attn = ops.paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, D]
            x = w.o.add(attn.reshape(num_tokens, self.q_size), x)
            gate_up = w.gate_up(ops.rms_norm(x, w.mlp_norm, eps))               # [T, 2 I]
            x = w.down.add(ops.silu_and_mul(gate_up), x)
        return ops.rms_norm(x, self.norm, eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (only the rows that sample) -> logits [S, V] in float32."""
        return self.lm_head(hidden).float()


class _Layer:
    """One decoder layer's norms and linears, looked up once so the forward pass does no string formatting."""

    __slots__ = ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")

    @classmethod
    def take(cls, weights: dict[str, torch.Tensor], i: int, pack: bool) -> "_Layer":
        layer = cls()
        prefix = f"layers.{i}."
        layer.attn_norm, layer.mlp_norm = weights[prefix + "attn_norm"], weights[prefix + "mlp_norm"]
        layer.qkv = Linear(weights[prefix + "qkv"], weights.get(prefix + "qkv_bias"), pack)
        layer.o = Linear(weights[prefix + "o"], None, pack)
        layer.gate_up = Linear(weights[prefix + "gate_up"], None, pack)
        layer.down = Linear(weights[prefix + "down"], None, pack)
        return layer
