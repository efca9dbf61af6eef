"""The arena's CUDA IPC description opened through cuda-python's driver bindings (rebuild_with_driver)
instead of torch's private rebuild: the same bytes, no copy (gpu marker; the JSON form is tested in
test_cuda_export.py on the CPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.arena.cuda_export import CudaIpcHandle, _DeviceBytes


def test_the_device_range_is_described_as_a_cuda_array():
    face = _DeviceBytes(0x7F0000001000, 4096).__cuda_array_interface__
    assert face["shape"] == (4096,) and face["typestr"] == "|u1" and face["data"] == (0x7F0000001000, False)


@pytest.mark.gpu
def test_a_worker_opens_the_arenas_memory_with_the_driver_and_sees_its_bytes():
    import torch

    from services.arena.cuda_export import describe
    buffer = (torch.arange(1 << 16, device="cuda:0") % 251).to(torch.uint8)
    exported = buffer.clone()                       # kept alive: the child maps this allocation
    desc = describe(exported)
    torch.cuda.synchronize()
    child = ("import json, sys, torch\nfrom services.arena.cuda_export import CudaIpcHandle, rebuild_with_driver\n"
             "t = rebuild_with_driver(CudaIpcHandle.from_dict(json.loads(sys.argv[1])))\n"
             "print(t.numel(), int(t.sum()))\n")
    out = subprocess.run([sys.executable, "-c", child, json.dumps(desc.to_dict())], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert isinstance(desc, CudaIpcHandle)
    assert int(out[0]) == buffer.numel() and int(out[1]) == int(buffer.sum())
