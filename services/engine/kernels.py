"""The ops the model's forward pass calls in every layer, as one set picked per device.

gpt-fast's shape: the model in `model.py` is plain torch and readable; the faster versions of its
per-layer ops are applied from outside through this table. Three sets exist:
  torch    the reference: torch ops only (every device, every dtype)
  cpu      `cpu_ops`: the C++ kernels in native/cpu_ops.cpp (fp32, bf16, fp16; other dtypes fall through
           to torch)
  cuda     `triton_attention`: Triton kernels for the KV write and paged attention, torch for the rest
`kernels_for` picks one; the native and Triton sets are imported lazily there, so an install
without them (no compiler at `make cpu-ops`, no Triton) runs the torch set unchanged.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from services.engine import attention


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] -> x / rms(x) * weight."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_tables_torch(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D/2] -> the [T, 1, 2, D/2] factors `apply_rope_torch` multiplies by: (cos, cos) and (-sin, sin)."""
    return torch.stack((cos, cos), dim=1).unsqueeze(1), torch.stack((-sin, sin), dim=1).unsqueeze(1)


def apply_rope_torch(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate-half rotary embedding. x [T, heads, D]; tables from `rope_tables_torch`. -> a new [T, heads, D].

    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), the same products and sums as Hugging Face's
    rotate_half, in four ops over all heads instead of slices, two products each half and a cat."""
    cos2, sin2 = tables
    halves = x.unflatten(-1, (2, -1))                                         # [T, heads, 2, D/2]
    return (halves * cos2).add_(halves.flip(-2) * sin2).flatten(-2)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2 I] (gate, then up) -> silu(gate) * up [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


class Kernels(NamedTuple):
    """The per-layer ops, with the signatures of the torch versions above and in `attention`."""

    write_kv: Callable[..., None]                       # attention.write_kv
    paged_attention: Callable[..., torch.Tensor]        # attention.paged_attention
    rms_norm: Callable[..., torch.Tensor] = rms_norm_torch
    rope_tables: Callable[..., object] = rope_tables_torch     # once per forward: what apply_rope reads
    apply_rope: Callable[..., torch.Tensor] = apply_rope_torch  # may rotate x in place; use its result
    silu_and_mul: Callable[..., torch.Tensor] = silu_and_mul_torch


TORCH_KERNELS = Kernels(attention.write_kv, attention.paged_attention)


@functools.cache
def kernels_for(device: torch.device) -> Kernels:
    """On CPU the native kernels where they load (`make cpu-ops` builds them), else torch's; on CUDA
    the Triton kernels where Triton imports (without it: torch's, correct but gathering every
    block and building masks per layer)."""
    if device.type == "cpu":
        from services.engine import cpu_ops
        return cpu_ops.KERNELS if cpu_ops.load() else TORCH_KERNELS
    if device.type != "cuda":
        return TORCH_KERNELS
    try:
        from services.engine import triton_attention
    except ImportError:
        return TORCH_KERNELS
    return triton_attention.KERNELS
