"""CUDA IPC export: the JSON form of a handle (anywhere), then a real export between two processes (gpu)."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.arena.cuda_export import CudaExport, CudaIpcHandle
from services.arena.export import ArenaExport, KVLayout

REPO = Path(__file__).resolve().parents[2]


def make_handle(**changes) -> CudaIpcHandle:
    fields = dict(device=0, handle=bytes(range(64)), storage_size_bytes=1 << 20, storage_offset_bytes=512,
                  ref_counter_handle=b"/torch_123_456_0", ref_counter_offset=3, event_handle=b"\x01" * 64,
                  event_sync_required=True)
    return CudaIpcHandle(**{**fields, **changes})


def make_export(**changes) -> ArenaExport:
    fields = dict(arena_pid=42, weights_segment="", weights_manifest={"embed": {"offset": 0, "shape": [2, 2],
                                                                                 "dtype": "float32", "nbytes": 16}},
                  kv_segment="", kv_spec=KVLayout(2, 8, 16, 1, 4, "float32"), model_dir="/m",
                  model_config_path="/m/config.json", model_config={"architecture": "llama"})
    return ArenaExport(**{**fields, **changes})


def test_handle_round_trips_through_json_with_bytes_as_base64():
    handle = make_handle()
    text = json.dumps(handle.to_dict())
    assert base64.b64encode(bytes(range(64))).decode() in text
    assert CudaIpcHandle.from_dict(json.loads(text)) == handle
    no_event = make_handle(event_handle=None, event_sync_required=False)
    assert CudaIpcHandle.from_dict(json.loads(json.dumps(no_event.to_dict()))) == no_event


def test_arena_document_carries_the_cuda_section_and_cpu_documents_are_unchanged():
    cuda = CudaExport(make_handle(), make_handle(storage_size_bytes=4096, ref_counter_offset=4))
    doc = make_export(device="cuda", cuda=cuda)
    raw = doc.to_json()
    assert b"pickle" not in raw and json.loads(raw)["cuda"]["kv"]["storage_size_bytes"] == 4096
    assert ArenaExport.from_json(raw) == doc
    cpu = make_export(weights_segment="duoserve-s-1-weights", kv_segment="duoserve-s-1-kv")
    parsed = ArenaExport.from_json(cpu.to_json())
    assert parsed == cpu and parsed.device == "cpu" and parsed.cuda is None
    older = json.loads(cpu.to_json())                      # a document from before the cuda fields
    del older["device"], older["cuda"]
    assert ArenaExport.from_json(json.dumps(older).encode()) == cpu


@pytest.mark.parametrize("bad", [
    {"handle": "not base64!"}, {"handle": ""}, {"device": -1}, {"storage_size_bytes": 0},
    {"ref_counter_offset": "3"}, {"event_sync_required": 1}, {"event_handle": 5}])
def test_bad_handles_are_refused(bad):
    data = {**make_handle().to_dict(), **bad}
    with pytest.raises(ValueError):
        CudaIpcHandle.from_dict(data)


def test_a_cuda_document_without_its_handles_is_refused():
    raw = json.loads(make_export(device="cuda", cuda=CudaExport(make_handle(), make_handle())).to_json())
    del raw["cuda"]["kv"]
    with pytest.raises(ValueError, match="weights' and 'kv'"):
        ArenaExport.from_json(json.dumps(raw).encode())
    with pytest.raises(ValueError, match="unknown device"):
        ArenaExport.from_json(json.dumps({**raw, "device": "tpu"}).encode())


# ---------------------------------------------------------------------------------------------- gpu

CHILD = textwrap.dedent("""
    import json, sys, torch
    from services.arena.cuda_export import CudaIpcHandle, rebuild
    desc = CudaIpcHandle.from_dict(json.loads(sys.stdin.readline()))
    before = torch.cuda.memory_allocated()
    buf = rebuild(desc)
    base, size = buf.untyped_storage().data_ptr(), buf.untyped_storage().nbytes()
    view = buf[4096:8192].view(torch.float32)           # a view, as weights_pack.unpack makes
    assert base <= view.data_ptr() and view.data_ptr() + view.numel() * 4 <= base + size
    print(json.dumps({"first": buf[:4].tolist(), "size": buf.numel(),
                      "allocated": torch.cuda.memory_allocated() - before}), flush=True)
    sys.stdin.readline()                                 # parent: "check"
    print(json.dumps({"seen": buf[100:104].tolist()}), flush=True)
    buf[200:204] = torch.tensor([9, 8, 7, 6], dtype=torch.uint8, device=buf.device)
    torch.cuda.synchronize()
    print("written", flush=True)
    sys.stdin.readline()                                 # parent: done
""")


@pytest.mark.gpu
def test_a_worker_process_rebuilds_the_allocation_without_copying():
    import torch
    from services.arena.cuda_export import describe

    buf = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")        # one allocation, like the arena's
    buf[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8, device=buf.device)
    torch.cuda.synchronize()
    desc = describe(buf)
    assert desc.storage_size_bytes == buf.numel()
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        child.stdin.write(json.dumps(desc.to_dict()) + "\n")
        child.stdin.flush()
        first = json.loads(child.stdout.readline())
        assert first == {"first": [1, 2, 3, 4], "size": 1 << 20, "allocated": 0}     # mapped, not copied
        buf[100:104] = torch.tensor([5, 6, 7, 8], dtype=torch.uint8, device=buf.device)   # arena writes ...
        torch.cuda.synchronize()
        child.stdin.write("check\n")
        child.stdin.flush()
        assert json.loads(child.stdout.readline()) == {"seen": [5, 6, 7, 8]}             # ... the worker sees it
        assert child.stdout.readline().strip() == "written"
        assert buf[200:204].tolist() == [9, 8, 7, 6]                                     # and the other way
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
