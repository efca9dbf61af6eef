"""The host-side fence that orders prefill's KV writes before decode's reads on the cuda backend.

Prefill and decode are two processes with their own CUDA streams over one KV allocation (CUDA IPC).
CUDA orders work only within a stream; nothing orders one process's kernels against another's
except the host. So prefill waits for its stream to finish the iteration that wrote a request's KV
*before* it publishes that request's hand-off to Redis, and decode reads the blocks only after it
has read the hand-off: the writes are complete before any read is issued. (An IPC event,
cuIpcGetEventHandle, would let decode's stream wait without blocking prefill's host thread; the
sampler's device-to-host copy already waits for the stream each iteration, so the fence costs
nothing extra today and states the ordering rather than relying on that side effect.)
"""
from __future__ import annotations

import torch


def kv_fence(kv_cache: torch.Tensor) -> None:
    """Block until the work queued on the pool's device by this thread's stream is done; no-op on CPU."""
    if kv_cache.device.type == "cuda":
        torch.cuda.current_stream(kv_cache.device).synchronize()
