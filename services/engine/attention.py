"""Paged attention in torch ops: the CPU backend's kernels and the reference the Triton kernels match.

The KV pool of one layer is two tensors `k_cache`, `v_cache` of shape [num_blocks, block_size, Hkv, D].
A request's tokens live in the blocks of its block table, in order: token t sits in block
`table[t // block_size]` at offset `t % block_size`. Its flat slot is `block_id * block_size + offset`.

A batch is ragged and flat: prefill chunks first (each `query_len` new tokens of one request,
attending to everything that request has in the cache, itself included), then decode rows (one
new token each). `AttentionMetadata` is built once per iteration and shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_decodes(self) -> int:
        return self.decode_block_tables.shape[0]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V in their slots. k, v: [T, Hkv, D]; caches: [N, block_size, Hkv, D]."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(num_slots, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Keys or values of whole blocks, in table order. cache [N, bs, Hkv, D], tables [B, M] -> [B, M*bs, Hkv, D]."""
    num_blocks, block_size = cache.shape[:2]
    rows = cache.view(num_blocks, -1).index_select(0, block_tables.reshape(-1))  # index_select beats fancy indexing ~5x on CPU
    return rows.view(block_tables.shape[0], block_tables.shape[1] * block_size, *cache.shape[2:])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention for a flat batch. q [T, H, D]; k, v [T, Hkv, D] (already written to the cache). -> [T, H, D]."""
    out = torch.empty_like(q)
    for seq in meta.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], k_cache, v_cache, seq, scale)
    if meta.num_decodes:
        out[meta.num_prefill_tokens:] = _decode_attention(
            q[meta.num_prefill_tokens:], k_cache, v_cache, meta, scale)
    return out


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """One chunk: q [n, H, D] attends causally to the request's whole context. -> [n, H, D]."""
    if seq.context_len == seq.query_len:
        # Whole prompt in one chunk: the fresh K/V are the context, no need to read the cache back.
        keys, values, mask, is_causal = k, v, None, True
    else:
        table = seq.block_table.view(1, -1)
        keys = gather_blocks(k_cache, table)[0, :seq.context_len]        # [ctx, Hkv, D]
        values = gather_blocks(v_cache, table)[0, :seq.context_len]
        # Query i sits at absolute position ctx - n + i and sees keys 0..that position.
        first_pos = seq.context_len - seq.query_len
        q_pos = torch.arange(first_pos, seq.context_len).view(-1, 1)
        mask, is_causal = torch.arange(seq.context_len).view(1, -1) <= q_pos, False  # [n, ctx]
    # 4-D inputs: torch's CPU flash kernel takes them; the 3-D path falls back to a ~3x slower one.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),    # [1, H, n, D], [1, Hkv, ctx, D]
        values.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One new token per row: q [B, H, D] attends to its row's cached keys. -> [B, H, D]."""
    keys = gather_blocks(k_cache, meta.decode_block_tables).transpose(1, 2)    # [B, Hkv, L, D]
    values = gather_blocks(v_cache, meta.decode_block_tables).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)  # [B, H, 1, D]
    return out.squeeze(2)


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference for tests: plain causal attention over one sequence. q [n, H, D]; k, v [n, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
