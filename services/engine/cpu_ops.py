"""The CPU kernels (`native/cpu_ops.cpp`) from Python: loading them and the `Kernels` set they give.

The library registers torch ops under `torch.ops.duoserve`; `make cpu-ops` (run by `make install`)
builds it with g++ against the installed torch (`native/build_cpu_ops.py`). Nothing happens at
import: `load` runs at the first CPU forward pass, once per path. Without the library (no compiler
at install, another torch, a non-x86 machine that never built it) the engine runs the torch ops in
`attention.py` and `kernels.py` instead, with the same results up to summation order in float32
(in bf16/fp16 also up to rounding: the kernels round once, torch's ops some intermediates too), and
says so once in the log.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from services.engine import kernels
from services.engine.attention import (AttentionMetadata, PrefillSeq, decode_attention_torch, decode_context_lens,
                                       paged_attention, prefill_attention_torch, write_kv)

DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "native" / "build" / "libduoserve_cpu_ops.so"
ABI_VERSION = 2             # kAbiVersion in native/cpu_ops.cpp that this module speaks

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what the kernels read; others take torch's ops

log = logging.getLogger(__name__)


@functools.cache
def load(path: Path = DEFAULT_LIBRARY) -> bool:
    """Load the CPU kernels into torch.ops.duoserve; False (logged once) when they cannot be used."""
    if not path.is_file():
        log.warning("CPU kernels %s not built (run `make cpu-ops`); the engine runs torch ops", path)
        return False
    try:
        torch.ops.load_library(str(path))
        version = torch.ops.duoserve.abi_version()
    except (OSError, RuntimeError) as e:
        log.warning("CPU kernels %s unusable (%s); rebuild with `make cpu-ops`; the engine runs torch ops", path, e)
        return False
    if version != ABI_VERSION:
        log.warning("CPU kernels %s speak ABI %d, this code %d: rebuild with `make cpu-ops`; the engine runs "
                    "torch ops", path, version, ABI_VERSION)
        return False
    log.info("CPU kernels loaded from %s (%s)", path, torch.ops.duoserve.isa())
    return True


def describe(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which kernel set a forward pass on `device` in `dtype` runs, for logs and benchmark headers."""
    if device.type != "cpu":
        return f"{device.type} kernels"
    if not load():
        return "torch ops (CPU kernels not built)"
    return f"CPU kernels {torch.ops.duoserve.isa()}" if dtype in NATIVE_DTYPES else "torch ops"


def write_kv_native(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """`attention.write_kv` as row copies (float32, bfloat16, float16)."""
    if k_cache.dtype not in NATIVE_DTYPES or k.dtype != k_cache.dtype:
        return write_kv(k_cache, v_cache, k, v, slot_mapping)
    torch.ops.duoserve.write_kv(k_cache, v_cache, k, v, slot_mapping)


def decode_attention_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """`attention.decode_attention_torch`'s contract, read straight from the paged pool (float32,
    bfloat16, float16 caches, computed in float32); other dtypes go to the torch ops. q [B, H, D] -> [B, H, D]."""
    if k_cache.dtype not in NATIVE_DTYPES or q.dtype != k_cache.dtype:
        return decode_attention_torch(q, k_cache, v_cache, meta, scale)
    return torch.ops.duoserve.paged_decode_attention(
        q, k_cache, v_cache, meta.decode_block_tables, decode_context_lens(meta), scale)


def prefill_attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, seq: PrefillSeq, scale: float) -> torch.Tensor:
    """`attention.prefill_attention_torch`'s contract, keys and values read back from the paged pool
    (float32, bfloat16, float16 caches, computed in float32; other dtypes go to the torch ops).
    q [n, H, D] -> [n, H, D]."""
    if k_cache.dtype not in NATIVE_DTYPES or q.dtype != k_cache.dtype:
        return prefill_attention_torch(q, k, v, k_cache, v_cache, seq, scale)
    return torch.ops.duoserve.prefill_attention(q, k_cache, v_cache, seq.block_table, seq.context_len, scale)


def paged_attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """`attention.paged_attention` with the decode rows and the prefill chunks on the native kernels."""
    return paged_attention(q, k, v, k_cache, v_cache, meta, scale, decode=decode_attention_native,
                           prefill=prefill_attention_native)


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`kernels.rms_norm_torch` in one pass over each row; computed in float32, rounded once to x's
    dtype."""
    if x.dtype not in NATIVE_DTYPES or weight.dtype != x.dtype:
        return kernels.rms_norm_torch(x, weight, eps)
    return torch.ops.duoserve.rms_norm(x, weight, eps)


def rope_tables_native(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] as the kernel reads them (for other dtypes, the torch tables)."""
    if cos.dtype not in NATIVE_DTYPES:
        return kernels.rope_tables_torch(cos, sin)
    return cos.contiguous(), sin.contiguous()


def apply_rope_native(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`kernels.apply_rope_torch`, rotating x [T, heads, D] in place; computed in float32, rounded
    once to x's dtype."""
    if x.dtype not in NATIVE_DTYPES:
        return kernels.apply_rope_torch(x, tables)
    return torch.ops.duoserve.rotary_embedding_(x, *tables)


def silu_and_mul_native(x: torch.Tensor) -> torch.Tensor:
    """`kernels.silu_and_mul_torch` in one pass; computed in float32, rounded once to x's dtype."""
    if x.dtype not in NATIVE_DTYPES:
        return kernels.silu_and_mul_torch(x)
    return torch.ops.duoserve.silu_and_mul(x)


KERNELS = kernels.Kernels(write_kv_native, paged_attention_native, rms_norm_native, rope_tables_native,
                          apply_rope_native, silu_and_mul_native)
