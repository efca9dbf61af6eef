"""Paged attention in torch ops: the CPU backend's kernels and the reference the Triton kernels match.

The KV pool of one layer is two tensors `k_cache`, `v_cache` of shape [num_blocks, Hkv, block_size, D]:
head-major inside a block, so the blocks of a request gathered head by head are already the
[Hkv, L, D] operand attention's matmuls read (no transpose copy after the gather). A request's
tokens live in the blocks of its block table, in order: token t sits in block
`table[t // block_size]` at offset `t % block_size`. Its flat slot is `block_id * block_size + offset`.

A batch is ragged and flat: prefill chunks first (each `query_len` new tokens of one request,
attending to everything that request has in the cache, itself included), then decode rows (one
new token each). `AttentionMetadata` is built once per iteration and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class PrefillSeq:
    """One prefill chunk in the flat batch."""

    query_start: int               # index of its first token in the flat batch
    query_len: int                 # new tokens in this chunk
    context_len: int               # tokens in the cache after this chunk (earlier chunks + this one)
    block_table: torch.Tensor      # [ceil(context_len / block_size)] int64


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where the new tokens' K/V go and what each query attends to."""

    slot_mapping: torch.Tensor            # [T] int64, flat slot of each new token's K/V
    prefills: tuple[PrefillSeq, ...]      # the first `num_prefill_tokens` tokens of the batch
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor     # [B, max_blocks] int64, padded with block 0
    decode_mask: torch.Tensor             # [B, 1, 1, max_blocks * block_size] bool, True where a key is real
    decode_context_lens: torch.Tensor | None = None   # [B] int32, keys per decode row (the Triton kernels read it)

    @property
    def num_decodes(self) -> int:
        return self.decode_block_tables.shape[0]


def decode_context_lens(meta: AttentionMetadata) -> torch.Tensor:
    """Keys each decode row attends to: the runner's [B] tensor, else counted from the mask."""
    if meta.decode_context_lens is not None:
        return meta.decode_context_lens
    return meta.decode_mask.view(meta.num_decodes, -1).sum(dim=1, dtype=torch.int32)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V in their slots. k, v: [T, Hkv, D]; caches: [N, Hkv, block_size, D]."""
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping.div(block_size, rounding_mode="floor"), slot_mapping.remainder(block_size)
    k_cache[blocks, :, offsets] = k                   # the indexed dims come first: [T, Hkv, D]
    v_cache[blocks, :, offsets] = v


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Keys or values of whole blocks, in table order. cache [N, Hkv, bs, D], tables [B, M] -> [B, Hkv, M*bs, D]."""
    num_blocks, num_heads, block_size, head_dim = cache.shape
    batch, width = block_tables.shape
    # Row (block, head) of the [N * Hkv, bs * D] view; ordering the index [B, Hkv, M] lays the result
    # out head-major with one copy. index_select beats fancy indexing ~5x on CPU.
    heads = torch.arange(num_heads, device=cache.device).view(1, num_heads, 1)
    rows = block_tables.view(batch, 1, width) * num_heads + heads
    out = cache.view(num_blocks * num_heads, block_size * head_dim).index_select(0, rows.view(-1))
    return out.view(batch, num_heads, width * block_size, head_dim)


DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
PrefillAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PrefillSeq, float],
                            torch.Tensor]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    decode: DecodeAttention | None = None, prefill: PrefillAttention | None = None) -> torch.Tensor:
    """Attention for a flat batch. q [T, H, D]; k, v [T, Hkv, D] (already written to the cache). -> [T, H, D].

    decode, prefill: the ops for the decode rows and for each prefill chunk (`decode_attention_torch`
    and `prefill_attention_torch` by default; `cpu_ops` passes its kernels' wrappers)."""
    decode = decode or decode_attention_torch
    prefill = prefill or prefill_attention_torch
    if not meta.prefills:                                 # pure decode: no copy into a shared output
        return decode(q, k_cache, v_cache, meta, scale)
    if len(meta.prefills) == 1 and not meta.num_decodes:  # one prompt (chunk) alone
        return prefill(q, k, v, k_cache, v_cache, meta.prefills[0], scale)
    out = torch.empty_like(q)
    for seq in meta.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        out[rows] = prefill(q[rows], k[rows], v[rows], k_cache, v_cache, seq, scale)
    if meta.num_decodes:
        out[meta.num_prefill_tokens:] = decode(q[meta.num_prefill_tokens:], k_cache, v_cache, meta, scale)
    return out


def prefill_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """One chunk: q [n, H, D] attends causally to the request's whole context. -> [n, H, D]."""
    if seq.context_len == seq.query_len:
        # Whole prompt in one chunk: the fresh K/V are the context, no need to read the cache back.
        keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)   # [1, Hkv, n, D]
        mask, is_causal = None, True
    else:
        table = seq.block_table.view(1, -1)
        keys = gather_blocks(k_cache, table)[:, :, :seq.context_len]        # [1, Hkv, ctx, D]
        values = gather_blocks(v_cache, table)[:, :, :seq.context_len]
        # Query i sits at absolute position ctx - n + i and sees keys 0..that position.
        first_pos = seq.context_len - seq.query_len
        q_pos = torch.arange(first_pos, seq.context_len, device=q.device).view(-1, 1)
        mask, is_causal = torch.arange(seq.context_len, device=q.device).view(1, -1) <= q_pos, False  # [n, ctx]
    # 4-D inputs: torch's CPU flash kernel takes them; the 3-D path falls back to a ~3x slower one.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys, values,                               # [1, H, n, D]
        attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per row: q [B, H, D] attends to its row's cached keys. -> [B, H, D].

    Plain matmuls, the G query heads of a KV head as the rows of one small GEMM: torch's SDPA
    with a mask over [B, H, 1, L] costs several times more on CPU (and ~3 ms a call in bf16)."""
    num_rows, num_heads, head_dim = q.shape
    keys = gather_blocks(k_cache, meta.decode_block_tables)               # [B, Hkv, L, D]
    values = gather_blocks(v_cache, meta.decode_block_tables)
    q = q.reshape(num_rows, keys.shape[1], -1, head_dim)                  # [B, Hkv, G, D]: head h reads KV head h // G
    scores = torch.matmul(q, keys.transpose(2, 3))                        # [B, Hkv, G, L]
    scores = scores.float().mul_(scale).masked_fill_(meta.decode_mask.logical_not(), float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)
    return torch.matmul(probs, values).view(num_rows, num_heads, head_dim)  # [B, Hkv, G, D] -> [B, H, D]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference for tests: plain causal attention over one sequence. q [n, H, D]; k, v [n, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
