"""Paged attention as Triton kernels: the CUDA backend's versions of `attention.write_kv` and
`attention.paged_attention`, same signatures, same results within floating-point tolerance.

Three kernels over the head-major KV pool of one layer (`k_cache`, `v_cache`: [N, Hkv, block_size, D]):
  write_kv    one program per new token: its K and V, every KV head, stored at its slot
  decode      one program per (decode row, KV head): the G query heads of that KV head are the rows
              of one tile, so each cached block is read once for the whole group (GQA)
  prefill     one program per (tile of a chunk's queries, query head): causal attention to the
              request's whole context in the cache (earlier chunks and this one), so chunked prefill
              and prefix continuation need no gather copy and no [n, ctx] mask in memory
Keys are read through the block table token by token (`table[pos // block_size]`), so tables may
be shuffled and padded; a program never reads past its row's context length.

Softmax is the online (flash) form in float32, scores scaled into base 2. Matmuls run in the
cache's dtype with float32 accumulation (fp32 inputs in IEEE precision, never TF32).

This module imports triton at the top: the engine reaches it only through
`kernels.kernels_for`, which imports it lazily, on CUDA. It needs no GPU to import, and
runs on CPU tensors under `TRITON_INTERPRET=1` (how the tests check it). The interpreter keeps
bfloat16 as raw 16-bit integers and does arithmetic on them as such, so on CPU tensors every tile
is widened to float32 right after its load (`UPCAST`); on the GPU tiles stay in their dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.attention import AttentionMetadata, PrefillSeq, decode_context_lens
from services.engine.kernels import Kernels

# Tiles: queries x keys per step of the prefill loop, keys per step of the decode loop.
PREFILL_BLOCK_M, PREFILL_BLOCK_N, DECODE_BLOCK_N = 64, 64, 64
MIN_DOT_ROWS = 16               # decode pads its head group to this: older Tritons need M >= 16 in tl.dot (3.9 pads itself)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_ct,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program t copies k[t], v[t] ([Hkv, D] each) to slot slots[t]; a negative slot is skipped."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    slot_ok = (heads * 0 + slot) >= 0                # as a [H] vector: the interpreter rejects a scalar in a mask
    ok = (heads[:, None] < NUM_KV_HEADS) & slot_ok[:, None] & (dims[None, :] < HEAD_DIM)
    dst = (slot // BLOCK_SIZE) * stride_cb + heads[:, None] * stride_ch + (slot % BLOCK_SIZE) * stride_ct + dims[None, :]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=ok)
    tl.store(v_cache_ptr + dst, v, mask=ok)


@triton.jit
def _attend_key_tile(q, m_i, l_i, acc, visible, k_cache_ptr, v_cache_ptr, table, pos, pos_ok, kv_head, dims,
                     d_ok, qk_scale, stride_cb, stride_ch, stride_ct, BLOCK_SIZE: tl.constexpr,
                     UPCAST: tl.constexpr):
    """One tile of N keys at positions `pos` through the block table, folded into the online softmax of
    the R query rows q [R, D]: running max m_i [R], sum l_i [R] and output acc [R, D] (base 2)."""
    blocks = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    kv_off = (blocks[:, None] * stride_cb + kv_head * stride_ch + (pos % BLOCK_SIZE)[:, None] * stride_ct
              + dims[None, :])                                                         # [N, D]
    kv_ok = pos_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + kv_off, mask=kv_ok, other=0.0)
    v = tl.load(v_cache_ptr + kv_off, mask=kv_ok, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale                     # [R, N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, context_lens_ptr, out_ptr, scale,
                   stride_qt, stride_qh, stride_cb, stride_ch, stride_ct, stride_tb, stride_ot, stride_oh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Program (row, kv_head): q[row, kv_head*G : (kv_head+1)*G] over the row's first context_lens[row] keys."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + row)
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_N)
    g_ok, d_ok = g < GROUP, dims < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)                          # [G, D]
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634          # log2(e): softmax in base 2, with exp2
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = tables_ptr + row.to(tl.int64) * stride_tb
    for start in range(0, context_len, BLOCK_N):
        pos = start + keys
        pos_ok = pos < context_len
        m_i, l_i, acc = _attend_key_tile(q, m_i, l_i, acc, pos_ok[None, :], k_cache_ptr, v_cache_ptr, table,
                                         pos, pos_ok, kv_head, dims, d_ok, qk_scale, stride_cb, stride_ch,
                                         stride_ct, BLOCK_SIZE, UPCAST)                # [G, D]
    out = acc / l_i[:, None]
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, out_ptr, scale, query_len, context_len,
                    stride_qt, stride_qh, stride_cb, stride_ch, stride_ct, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Program (tile, head): queries tile*M.. of one chunk; query i sits at position
    context_len - query_len + i and sees keys 0..that position."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    keys = tl.arange(0, BLOCK_N)
    rows_ok, d_ok = rows < query_len, dims < HEAD_DIM
    q_pos = context_len - query_len + rows                                              # [M]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=rows_ok[:, None] & d_ok[None, :], other=0.0)                       # [M, D]
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The tile's last query sees keys up to its own position: nothing beyond is read.
    kv_end = tl.minimum(context_len, context_len - query_len + (tile + 1) * BLOCK_M)
    for start in range(0, kv_end, BLOCK_N):
        pos = start + keys
        pos_ok = pos < kv_end
        # Key 0 is visible to every row, so after the first step no row's max is -inf (no NaN).
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]                   # [M, N]
        m_i, l_i, acc = _attend_key_tile(q, m_i, l_i, acc, visible, k_cache_ptr, v_cache_ptr, table_ptr,
                                         pos, pos_ok, kv_head, dims, d_ok, qk_scale, stride_cb, stride_ch,
                                         stride_ct, BLOCK_SIZE, UPCAST)                # [M, D]
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V in their slots. k, v: [T, Hkv, D]; caches: [N, Hkv, block_size, D]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(k, v, k_cache, v_cache)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row. q [B, H, D]; block_tables [B, M] (padded, any order); context_lens [B]. -> [B, H, D]."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    out = _output_for(q, k_cache, v_cache, out)
    if num_rows == 0:
        return out
    group = num_heads // num_kv_heads
    _decode_kernel[(num_rows, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=DECODE_BLOCK_N, UPCAST=q.device.type == "cpu")
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq: PrefillSeq,
                      scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk: q [n, H, D] attends causally to the request's whole context, read from the cache
    (its own K/V already written there). -> [n, H, D]."""
    query_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    out = _output_for(q, k_cache, v_cache, out)
    if query_len == 0:
        return out
    grid = (triton.cdiv(query_len, PREFILL_BLOCK_M), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, seq.block_table, out, scale, query_len, seq.context_len,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, BLOCK_D=triton.next_power_of_2(head_dim),
        UPCAST=q.device.type == "cpu")
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention for a flat batch. q [T, H, D]; k, v [T, Hkv, D] (already written to the cache). -> [T, H, D].

    k and v are not read: every key comes from the cache. Each prefill chunk is one launch (its
    lengths are Python ints, so nothing is copied to the device per layer); decode rows are one."""
    out = torch.empty_like(q)
    for seq in meta.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        prefill_attention(q[rows], k_cache, v_cache, seq, scale, out=out[rows])
    if meta.num_decodes:
        rows = slice(meta.num_prefill_tokens, None)
        decode_attention(q[rows], k_cache, v_cache, meta.decode_block_tables, decode_context_lens(meta),
                         scale, out=out[rows])
    return out


def _output_for(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                out: torch.Tensor | None) -> torch.Tensor:
    """The attention output (the caller's or a new one like q); for a non-empty q, every operand
    checked for the layout the kernels step through."""
    out = torch.empty_like(q) if out is None else out
    if q.shape[0]:
        _check_last_dim_contiguous(q, k_cache, v_cache, out)
    return out


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    """The kernels step the head dim with stride 1 (every view the model passes has it)."""
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the last dim must be contiguous, got strides {t.stride()}")


KERNELS = Kernels(write_kv, paged_attention)     # norms, rope and SwiGLU: the torch ops
