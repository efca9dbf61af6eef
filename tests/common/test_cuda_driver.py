"""services.common.cuda_driver: cuda-python's driver bindings. Without a GPU: it imports, names what
is missing (cuda-python, the driver), and checks its arguments before any driver call. With one
(gpu marker): the SM count, IPC memory and event handles across processes, green partitions."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.common import cuda_driver
from services.common.cuda_driver import CudaDriverError, IpcEvent


def _has_driver() -> bool:
    try:
        cuda_driver.driver()
    except CudaDriverError:
        return False
    return True


def test_without_cuda_python_every_call_says_how_to_install_it():
    code = ("import sys; sys.modules['cuda.bindings'] = None\n"
            "from services.common import cuda_driver\n"
            "try:\n    cuda_driver.sm_count(0)\nexcept cuda_driver.CudaDriverError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "cuda-python is not installed" in out and "pip install cuda-python" in out


@pytest.mark.skipif(_has_driver(), reason="this machine has an NVIDIA driver")
def test_without_a_driver_the_error_names_libcuda():
    pytest.importorskip("cuda.bindings.driver")
    with pytest.raises(CudaDriverError, match="libcuda|cuInit"):
        cuda_driver.sm_count(0)


@pytest.mark.parametrize("call", [
    lambda: cuda_driver.device_info(-1),
    lambda: cuda_driver.device_info("0"),
    lambda: cuda_driver.ipc_mem_handle(0),
    lambda: cuda_driver.open_ipc_mem(b"short"),
    lambda: IpcEvent.open(b"\0" * 63),
    lambda: IpcEvent.open("not bytes"),
    lambda: cuda_driver.create_green_partitions([]),
    lambda: cuda_driver.create_green_partitions([8, 0]),
])
def test_bad_arguments_are_refused_before_the_driver_is_touched(call):
    with pytest.raises(ValueError):
        call()


def test_a_handle_is_exactly_64_bytes():
    raw = bytes(range(64))
    assert cuda_driver.check_handle(bytearray(raw)) == raw
    with pytest.raises(ValueError, match="64 bytes, got 65"):
        cuda_driver.check_handle(raw + b"x", "IPC event handle")


# ---------------------------------------------------------------------------------------------- gpu

@pytest.mark.gpu
def test_the_drivers_sm_count_is_torchs():
    import torch
    info = cuda_driver.device_info(0)
    assert info.sm_count == torch.cuda.get_device_properties(0).multi_processor_count
    assert info.compute_capability == torch.cuda.get_device_capability(0) and info.name


@pytest.mark.gpu
def test_the_ipc_memory_handle_is_the_one_torch_exports_and_opens_the_same_memory():
    import torch
    from torch.multiprocessing.reductions import reduce_tensor
    buffer = torch.arange(1 << 20, dtype=torch.uint8, device="cuda:0")
    args = reduce_tensor(buffer)[1]
    handle, offset = bytes(args[7]), int(args[9])
    base = buffer.data_ptr() - offset                      # the cudaMalloc block torch's allocator carved it from
    assert cuda_driver.ipc_mem_handle(base) == handle
    child = ("import sys, torch\nfrom services.common import cuda_driver\n"
             "torch.zeros(1, device='cuda:0')\n"
             "ptr = cuda_driver.open_ipc_mem(bytes.fromhex(sys.argv[1])) + int(sys.argv[2])\n"
             "host = bytearray(16)\nimport ctypes\nbuf = (ctypes.c_char * 16).from_buffer(host)\n"
             "cuda_driver._call('cuMemcpyDtoH', ctypes.addressof(buf), ptr, 16)\nprint(list(host))\n")
    torch.cuda.synchronize()
    out = subprocess.run([sys.executable, "-c", child, handle.hex(), str(offset)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == str(list(range(16)))


@pytest.mark.gpu
def test_an_ipc_event_makes_another_processes_stream_wait_on_the_device():
    import torch
    torch.zeros(1, device="cuda:0")
    event = IpcEvent.create(0)
    stream = torch.cuda.current_stream(0).cuda_stream
    torch.cuda._sleep(200_000_000)                           # ~0.1 s of GPU time on this stream
    event.record(stream)
    assert not event.done()
    child = ("import sys, torch\nfrom services.common.cuda_driver import IpcEvent\n"
             "torch.zeros(1, device='cuda:0')\ne = IpcEvent.open(bytes.fromhex(sys.argv[1]))\n"
             "e.wait(torch.cuda.current_stream(0).cuda_stream)\ntorch.cuda.synchronize()\nprint(e.done())\n")
    out = subprocess.run([sys.executable, "-c", child, event.handle.hex()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "True"


@pytest.mark.gpu
def test_green_partitions_get_at_least_the_sms_asked_for():
    resource = cuda_driver.sm_resource(0)
    parts = cuda_driver.create_green_partitions([8, resource.sm_count // 2])
    try:
        assert all(p.sm_count >= p.requested and p.stream_handle for p in parts)
    finally:
        cuda_driver.destroy_green_partitions(parts)


def test_green_shares_are_for_gpus_and_shares_in_range():
    from services.common.cuda_driver import GreenShares
    from services.common.shares import UnitSpace
    with pytest.raises(ValueError, match="GPU's SMs"):
        GreenShares.create(UnitSpace.cpu(4), [0.5])
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        GreenShares.create(UnitSpace.cuda(132), [0.0, 0.5])


@pytest.mark.gpu
def test_green_shares_pick_the_smallest_partition_holding_a_phases_sms():
    from services.common.cuda_driver import GreenShares
    from services.common.shares import UnitSpace
    space = UnitSpace.cuda(cuda_driver.sm_count(0))
    green = GreenShares.create(space, [0.25, 0.5, 1.0])
    try:
        sizes = [p.sm_count for p in green.partitions]
        assert sizes == sorted(sizes) and sizes[-1] == space.num_units or sizes[-1] >= space.num_units - 8
        assert green.for_units(space.units_for(0.25)).sm_count >= space.units_for(0.25)
    finally:
        green.close()
