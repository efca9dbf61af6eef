"""The C++ CPU kernels (native/cpu_ops.cpp) against the torch ops they replace, and their errors.

Built by `make cpu-ops` (`make install` and `make test` run it); skipped, with the reason, where they are not built.
Paged attention against dense attention for both kernel sets is in test_attention.py.
"""
from __future__ import annotations

import pytest
import torch

from services.engine import cpu_ops, kernels
from services.engine.attention import (AttentionMetadata, PrefillSeq, decode_attention_torch, prefill_attention_torch,
                                       write_kv)

pytestmark = pytest.mark.skipif(not cpu_ops.load(), reason=f"CPU kernels not built ({cpu_ops.DEFAULT_LIBRARY}): "
                                                           "run `make cpu-ops`")
BS = 16


def _pool(num_blocks: int, num_kv_heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, num_kv_heads, BS, head_dim, generator=g),
            torch.randn(num_blocks, num_kv_heads, BS, head_dim, generator=g))


def _cached(cache: torch.Tensor, table: torch.Tensor, positions: range) -> torch.Tensor:
    """What the pool holds for these positions: the chunk's fresh K or V, [n, Hkv, D]."""
    return torch.stack([cache[int(table[p // BS]), :, p % BS] for p in positions])


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 48), (6, 1, 64)])
def test_decode_attention_matches_torch(num_heads: int, num_kv_heads: int, head_dim: int):
    """Ragged rows over shuffled, padded tables; D 64 and 128 take the unrolled variants, 48 the generic one."""
    num_blocks, lens = 64, torch.tensor([1, 16, 17, 100, 37], dtype=torch.int32)
    k_cache, v_cache = _pool(num_blocks, num_kv_heads, head_dim, seed=head_dim)
    width = int(lens.max() + BS - 1) // BS
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))[: len(lens) * width].view(len(lens), width)
    mask = (torch.arange(width * BS).view(1, -1) < lens.view(-1, 1)).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), (), 0, tables, mask, lens)
    q = torch.randn(len(lens), num_heads, head_dim)
    expected = decode_attention_torch(q, k_cache, v_cache, meta, head_dim ** -0.5)
    torch.testing.assert_close(cpu_ops.decode_attention_native(q, k_cache, v_cache, meta, head_dim ** -0.5), expected)


@pytest.mark.parametrize("num_parts", [0, 1, 2, 3, 7, 80])
def test_decode_attention_split_k_matches_torch(num_parts: int):
    """Rows cut into parts (split-K) and merged: rows shorter than a part, parts beyond a row's end
    (80 parts of a 1000-token row: 63 blocks), and 0, which lets the kernel decide (a 1-row batch of
    3 KV heads splits whenever the machine has more than one thread)."""
    num_blocks, lens = 128, torch.tensor([1000, 1, 17, 300], dtype=torch.int32)
    k_cache, v_cache = _pool(num_blocks, 3, 64, seed=num_parts)
    width = int(lens.max() + BS - 1) // BS
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(4))[:width * 2].view(2, width)
    tables = torch.cat([tables, tables.flip(1)])                     # rows may share blocks: reads only
    mask = (torch.arange(width * BS).view(1, -1) < lens.view(-1, 1)).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), (), 0, tables, mask, lens)
    q = torch.randn(len(lens), 9, 64)
    expected = decode_attention_torch(q, k_cache, v_cache, meta, 0.125)
    for rows in (slice(0, 1), slice(0, 4)):                           # one long row alone, then the batch
        got = torch.ops.duoserve.paged_decode_attention(q[rows], k_cache, v_cache, tables[rows], lens[rows], 0.125,
                                                        num_parts)
        torch.testing.assert_close(got, expected[rows])


@pytest.mark.parametrize("query_len,context_len", [(512, 512), (70, 70), (1, 1), (21, 50), (1, 300), (130, 200)])
def test_prefill_attention_matches_torch(query_len: int, context_len: int):
    """Whole prompts, chunks over a cached prefix, one-token chunks; more than one query tile."""
    k_cache, v_cache = _pool(64, 3, 64, seed=context_len)
    table = torch.randperm(64, generator=torch.Generator().manual_seed(2))[: -(-context_len // BS)]
    q = torch.randn(query_len, 9, 64)
    first = context_len - query_len
    fresh_k, fresh_v = (_cached(c, table, range(first, context_len)) for c in (k_cache, v_cache))
    seq = PrefillSeq(0, query_len, context_len, table)
    expected = prefill_attention_torch(q, fresh_k, fresh_v, k_cache, v_cache, seq, 0.125)
    got = cpu_ops.prefill_attention_native(q, fresh_k, fresh_v, k_cache, v_cache, seq, 0.125)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_reads_half_precision_caches(dtype: torch.dtype):
    """bf16 and fp16 pools are read as float32 and computed in float32: within the output's rounding
    of float32 attention over the same (rounded) numbers, decode and prefill, D 64 and the generic D."""
    for num_heads, num_kv_heads, head_dim in ((9, 3, 64), (4, 2, 48)):
        k_cache, v_cache = (c.to(dtype) for c in _pool(64, num_kv_heads, head_dim, seed=head_dim))
        lens = torch.tensor([1, 17, 100], dtype=torch.int32)
        tables = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:21].view(3, 7)
        mask = (torch.arange(7 * BS).view(1, -1) < lens.view(-1, 1)).view(3, 1, 1, -1)
        meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), (), 0, tables, mask, lens)
        q = torch.randn(3, num_heads, head_dim).to(dtype)
        expected = decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), meta, head_dim ** -0.5)
        got = cpu_ops.decode_attention_native(q, k_cache, v_cache, meta, head_dim ** -0.5)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)
        seq = PrefillSeq(0, 70, 100, tables[2])                    # a chunk over a cached prefix, two tiles
        q = torch.randn(70, num_heads, head_dim).to(dtype)
        fresh = [_cached(c.float(), tables[2], range(30, 100)) for c in (k_cache, v_cache)]
        expected = prefill_attention_torch(q.float(), *fresh, k_cache.float(), v_cache.float(), seq, 0.125)
        got = cpu_ops.prefill_attention_native(q, *(f.to(dtype) for f in fresh), k_cache, v_cache, seq, 0.125)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)


def test_prefill_attention_reads_strided_queries():
    """q as the model passes it: a view into the fused qkv output (row stride wider than H * D)."""
    k_cache, v_cache = _pool(8, 2, 32, seed=3)
    table = torch.tensor([5, 1, 7])
    qkv = torch.randn(40, (4 + 2 * 2) * 32)
    q = qkv[:, : 4 * 32].view(40, 4, 32)
    seq = PrefillSeq(0, 40, 40, table)
    fresh = [_cached(c, table, range(40)) for c in (k_cache, v_cache)]
    expected = prefill_attention_torch(q.contiguous(), *fresh, k_cache, v_cache, seq, 0.2)
    torch.testing.assert_close(cpu_ops.prefill_attention_native(q, *fresh, k_cache, v_cache, seq, 0.2), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_matches_torch_with_strided_inputs(dtype: torch.dtype):
    k_cache, v_cache = torch.zeros(6, 3, BS, 64, dtype=dtype), torch.zeros(6, 3, BS, 64, dtype=dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(7, (9 + 6) * 64).to(dtype)
    k, v = qkv[:, 9 * 64: 12 * 64].view(7, 3, 64), qkv[:, 12 * 64:].view(7, 3, 64)
    slots = torch.tensor([95, 0, 17, 33, 34, 50, 81])
    write_kv(ref_k, ref_v, k, v, slots)
    cpu_ops.write_kv_native(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


# Half-precision results are rounded once from float32; torch's ops round some intermediates too.
POINTWISE_TOLERANCE = {torch.float32: {}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
                       torch.float16: {"atol": 2e-3, "rtol": 2e-3}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 32, 300])
def test_pointwise_ops_match_torch(rows: int, dtype: torch.dtype):
    """Each op against its torch version computed in float32 on the same (rounded) inputs."""
    g = torch.Generator().manual_seed(rows)
    tolerance = POINTWISE_TOLERANCE[dtype]

    def close(got: torch.Tensor, expected: torch.Tensor) -> None:
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), **tolerance)

    x, weight = (torch.randn(rows, 576, generator=g) * 3).to(dtype), torch.randn(576, generator=g).to(dtype)
    close(cpu_ops.rms_norm_native(x, weight, 1e-5), kernels.rms_norm_torch(x.float(), weight.float(), 1e-5))
    gate_up = torch.randn(rows, 2 * 1536, generator=g) * 8          # wide range: silu's both tails
    gate_up[0, :4] = torch.tensor([-200.0, -88.0, 0.0, 200.0])
    gate_up = gate_up.to(dtype)
    close(cpu_ops.silu_and_mul_native(gate_up), kernels.silu_and_mul_torch(gate_up.float()))
    qkv = torch.randn(rows, (9 + 3 + 3) * 64, generator=g).to(dtype)
    cos, sin = torch.randn(rows, 32, generator=g).cos().to(dtype), torch.randn(rows, 32, generator=g).sin().to(dtype)
    expected = kernels.apply_rope_torch(qkv[:, :12 * 64].float().view(rows, 12, 64),
                                        kernels.rope_tables_torch(cos.float(), sin.float()))
    untouched = qkv[:, 12 * 64:].clone()
    got = cpu_ops.apply_rope_native(qkv[:, :12 * 64].view(rows, 12, 64), cpu_ops.rope_tables_native(cos, sin))
    close(got, expected)
    assert torch.equal(qkv[:, 12 * 64:], untouched)               # the values next to q and k are left alone


def test_bfloat16_stores_round_as_torch_casts():
    """The kernels' float32 -> bfloat16 rounding (nearest, ties to even; NaN and infinity kept) bit for
    bit against torch's cast. SwiGLU with gates >= 17, where silu(g) == g in float32, stores the exact
    product gate * up: two 8-bit mantissas, so many products sit exactly halfway between bf16 values."""
    g = torch.Generator().manual_seed(7)
    gate = (17 + torch.rand(4096, generator=g) * 1000).to(torch.bfloat16)
    up = (torch.randn(4096, generator=g) * 4).to(torch.bfloat16)
    gate[:3] = torch.tensor([float("nan"), float("inf"), 3e38])       # NaN, infinity, an overflow to infinity
    up[:3] = torch.tensor([1.0, 2.0, 1.5])
    expected = (gate.float() * up.float()).to(torch.bfloat16)
    got = cpu_ops.silu_and_mul_native(torch.cat([gate, up]).view(1, -1))[0]
    torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)


def test_other_dtypes_take_the_torch_ops():
    x, weight = torch.randn(4, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    assert torch.equal(cpu_ops.rms_norm_native(x, weight, 1e-6), kernels.rms_norm_torch(x, weight, 1e-6))
    gate_up = torch.randn(4, 128, dtype=torch.float64)
    assert torch.equal(cpu_ops.silu_and_mul_native(gate_up), kernels.silu_and_mul_torch(gate_up))


def test_bad_block_ids_and_lengths_raise_instead_of_reading_outside_the_pool():
    k_cache, v_cache = _pool(4, 1, 64, seed=5)
    q = torch.randn(1, 2, 64)
    with pytest.raises(RuntimeError, match="names block 9, outside the pool's 0..3"):
        torch.ops.duoserve.paged_decode_attention(q, k_cache, v_cache, torch.tensor([[9]]),
                                                  torch.tensor([3], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="num_parts must be >= 0"):
        torch.ops.duoserve.paged_decode_attention(q, k_cache, v_cache, torch.tensor([[0]]),
                                                  torch.tensor([3], dtype=torch.int32), 0.1, -1)
    with pytest.raises(RuntimeError, match="context_len 40, outside 1..16"):
        torch.ops.duoserve.paged_decode_attention(q, k_cache, v_cache, torch.tensor([[0]]),
                                                  torch.tensor([40], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="block -1 is outside"):
        torch.ops.duoserve.prefill_attention(q, k_cache, v_cache, torch.tensor([-1]), 1, 0.1)
    with pytest.raises(RuntimeError, match="slot 64 is outside"):
        torch.ops.duoserve.write_kv(k_cache, v_cache, torch.randn(1, 1, 64), torch.randn(1, 1, 64), torch.tensor([64]))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 only, got Double"):
        torch.ops.duoserve.paged_decode_attention(q.double(), k_cache.double(), v_cache.double(), torch.tensor([[0]]),
                                                  torch.tensor([3], dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="q is BFloat16, the caches Float"):
        torch.ops.duoserve.prefill_attention(q.bfloat16(), k_cache, v_cache, torch.tensor([0]), 1, 0.1)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        torch.ops.duoserve.write_kv(k_cache, v_cache, torch.randn(1, 1, 64).bfloat16(), torch.randn(1, 1, 64),
                                    torch.tensor([0]))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 only, got Double"):
        torch.ops.duoserve.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-6)


def test_cpu_forward_uses_the_native_kernels_and_says_which():
    assert kernels.kernels_for(torch.device("cpu")) is cpu_ops.KERNELS
    isa = torch.ops.duoserve.isa()
    assert isa in ("x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2, FMA)", "baseline")
    assert cpu_ops.describe(torch.device("cpu")) == f"CPU kernels {isa}"
    assert cpu_ops.describe(torch.device("cpu"), torch.bfloat16) == f"CPU kernels {isa}"
    assert cpu_ops.describe(torch.device("cpu"), torch.float64) == "torch ops"


def test_a_missing_library_means_torch_ops(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert not cpu_ops.load(tmp_path / "libduoserve_cpu_ops.so")
    assert "not built (run `make cpu-ops`)" in caplog.text
