"""Paged decode attention on the CPU, side by side: the torch ops, the C++ kernel with one task per
(row, KV head), and the same kernel with split-K (each row's keys cut into parts that run as
separate tasks and are merged), over batch sizes and context lengths.

Split-K matters where a batch has fewer (row, KV head) pairs than the machine has threads to keep
busy: a single long conversation on a many-core server. The shapes are SmolLM2-135M's (9 query
heads over 3 KV heads, D 64, blocks of 16); every row of a batch has the same context length;
timings are the median of interleaved repeats of one layer's call, each from cold caches.

    python -m bench.decode_attention [--contexts 1024,4096,16384] [--batch-sizes 1,4,32] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from bench.engine import interleaved_medians
from services.engine import cpu_ops
from services.engine.attention import AttentionMetadata, decode_attention_torch

BLOCK_SIZE = 16
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _inputs(batch: int, context: int, dtype: torch.dtype):
    """A pool holding every row's blocks (shuffled), the rows' tables and lengths, and the queries."""
    width = -(-context // BLOCK_SIZE)
    num_blocks = batch * width
    g = torch.Generator().manual_seed(batch * 100003 + context)
    k_cache = torch.randn(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g).view(batch, width)
    lens = torch.full((batch,), context, dtype=torch.int32)
    mask = torch.ones(batch, 1, 1, width * BLOCK_SIZE, dtype=torch.bool)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64), (), 0, tables, mask, lens)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=g).to(dtype)
    return q, k_cache, v_cache, meta


def _cold(fn: Callable[[], object], flush: torch.Tensor) -> Callable[[], float]:
    """`fn` timed from cold caches (seconds), as in a forward pass, where a layer's keys were last read
    a whole step (every weight and every other layer's KV) earlier: `flush` is rewritten first."""
    def once() -> float:
        flush.add_(1.0)
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return once


def measure(batch: int, context: int, dtype: torch.dtype, repeats: int, flush: torch.Tensor) -> dict[str, float]:
    """Each way's median milliseconds for one call."""
    q, k_cache, v_cache, meta = _inputs(batch, context, dtype)
    lens, scale = meta.decode_context_lens, HEAD_DIM ** -0.5
    op = torch.ops.duoserve.paged_decode_attention
    fns = {
        "torch": lambda: decode_attention_torch(q, k_cache, v_cache, meta, scale),
        "kernel, 1 part": lambda: op(q, k_cache, v_cache, meta.decode_block_tables, lens, scale, 1),
        "kernel, split-K": lambda: op(q, k_cache, v_cache, meta.decode_block_tables, lens, scale, 0),
    }
    medians = interleaved_medians([_cold(fn, flush) for fn in fns.values()], repeats)
    return {name: seconds * 1000 for name, seconds in zip(fns, medians)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,4096,16384", help="keys per row")
    parser.add_argument("--batch-sizes", default="1,4,32")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--flush-mb", type=int, default=512, help="memory rewritten before each call (> the L3)")
    args = parser.parse_args(argv)
    flush = torch.zeros(args.flush_mb * 2**20 // 4)
    if not cpu_ops.load():
        parser.error("the CPU kernels are not built: run `make cpu-ops`")
    print(f"paged decode attention, one layer, ms (median of {args.repeats}); {args.dtype}, "
          f"{torch.get_num_threads()} threads, kernels {torch.ops.duoserve.isa()}")
    print("| batch | context | torch ops | kernel, 1 part | kernel, split-K | split-K vs 1 part |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            ms = measure(batch, context, DTYPES[args.dtype], args.repeats, flush)
            one, split = ms["kernel, 1 part"], ms["kernel, split-K"]
            print(f"| {batch} | {context} | {ms['torch']:.3f} | {one:.3f} | {split:.3f} | {one / split:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
