"""Paged attention equals dense causal attention: ragged lengths, scattered block tables, chunks.

Every test runs on both CPU kernel sets: the torch ops and the C++ kernels (`make cpu-ops`)."""
from __future__ import annotations

import pytest
import torch

from services.engine import cpu_ops
from services.engine.attention import AttentionMetadata, PrefillSeq, dense_causal_attention
from services.engine.kernels import TORCH_KERNELS, Kernels

BS, HKV, GROUP, D, NUM_BLOCKS = 16, 2, 3, 32, 64
H = HKV * GROUP
SCALE = D ** -0.5


def _slots(table: list[int], positions: range) -> list[int]:
    return [table[p // BS] * BS + p % BS for p in positions]


def _empty_decode() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((0, 1), dtype=torch.int64), torch.zeros((0, 1, 1, BS), dtype=torch.bool)


@pytest.fixture(params=["torch", "native"])
def kernels(request: pytest.FixtureRequest) -> Kernels:
    if request.param == "torch":
        return TORCH_KERNELS
    if not cpu_ops.load():
        pytest.skip(f"the CPU kernels are not built ({cpu_ops.DEFAULT_LIBRARY}): run `make cpu-ops`")
    return cpu_ops.KERNELS


def test_prefill_then_decode_matches_dense_for_ragged_sequences(kernels: Kernels):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 37, 16, 70]
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()      # tables far from contiguous
    tables, cursor = [], 0
    for n in lengths:
        k = -(-(n + 1) // BS)
        tables.append(perm[cursor:cursor + k]); cursor += k
    seqs = [(torch.randn(n + 1, H, D, generator=g), torch.randn(n + 1, HKV, D, generator=g),
             torch.randn(n + 1, HKV, D, generator=g)) for n in lengths]
    k_cache = torch.full((NUM_BLOCKS, HKV, BS, D), float("nan"))   # unwritten slots must never be read
    v_cache = k_cache.clone()

    # Prefill all prompts (all tokens but the last) in one flat batch.
    q = torch.cat([s[0][:n] for s, n in zip(seqs, lengths)]); k = torch.cat([s[1][:n] for s, n in zip(seqs, lengths)])
    v = torch.cat([s[2][:n] for s, n in zip(seqs, lengths)])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    slots = sum((_slots(t, range(n)) for t, n in zip(tables, lengths)), [])
    meta = AttentionMetadata(torch.tensor(slots), tuple(PrefillSeq(st, n, n, torch.tensor(t)) for st, n, t in
                                                        zip(starts, lengths, tables)), sum(lengths), *_empty_decode())
    kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = kernels.paged_attention(q, k, v, k_cache, v_cache, meta, SCALE)
    for (sq, sk, sv), n, st in zip(seqs, lengths, starts):
        torch.testing.assert_close(out[st:st + n], dense_causal_attention(sq[:n], sk[:n], sv[:n], SCALE))

    # Decode the last token of every sequence in one batch.
    q = torch.stack([s[0][n] for s, n in zip(seqs, lengths)]); k = torch.stack([s[1][n] for s, n in zip(seqs, lengths)])
    v = torch.stack([s[2][n] for s, n in zip(seqs, lengths)])
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    mask = (torch.arange(width * BS).view(1, -1) < torch.tensor(lengths).view(-1, 1) + 1).view(len(lengths), 1, 1, -1)
    slots = [_slots(t, range(n, n + 1))[0] for t, n in zip(tables, lengths)]
    meta = AttentionMetadata(torch.tensor(slots), (), 0, padded, mask)
    k_cache.nan_to_num_(0.0); v_cache.nan_to_num_(0.0)   # padding blocks are read (masked), so no NaN there
    kernels.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = kernels.paged_attention(q, k, v, k_cache, v_cache, meta, SCALE)
    for i, ((sq, sk, sv), n) in enumerate(zip(seqs, lengths)):
        torch.testing.assert_close(out[i], dense_causal_attention(sq, sk, sv, SCALE)[n])


def test_chunked_prefill_over_cached_prefix_matches_dense(kernels: Kernels):
    g = torch.Generator().manual_seed(1)
    n, split = 50, 21
    table = [9, 3, 40, 17]
    q, k, v = (torch.randn(n, H, D, generator=g), torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g))
    k_cache = torch.zeros(NUM_BLOCKS, HKV, BS, D); v_cache = torch.zeros_like(k_cache)
    outs = []
    for lo, hi in ((0, split), (split, n)):
        meta = AttentionMetadata(torch.tensor(_slots(table, range(lo, hi))),
                                 (PrefillSeq(0, hi - lo, hi, torch.tensor(table[: -(-hi // BS)])),), hi - lo,
                                 *_empty_decode())
        kernels.write_kv(k_cache, v_cache, k[lo:hi], v[lo:hi], meta.slot_mapping)
        outs.append(kernels.paged_attention(q[lo:hi], k[lo:hi], v[lo:hi], k_cache, v_cache, meta, SCALE))
    torch.testing.assert_close(torch.cat(outs), dense_causal_attention(q, k, v, SCALE))
