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


def test_only_whole_cuda_buffers_are_described_and_rebuilding_needs_a_gpu():
    import torch

    from services.arena.cuda_export import describe, rebuild
    with pytest.raises(ValueError, match="flat uint8 CUDA"):
        describe(torch.zeros(16, dtype=torch.uint8))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            rebuild(make_handle())


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


def test_a_cuda_worker_refuses_a_cpu_arena_and_the_reverse(tmp_path):
    """The arena's own socket code serving a document; the worker's own attach refusing it."""
    import threading

    from services.arena.client import attach_arena
    from services.arena.main import ArenaMetrics, listen_private, serve_socket
    stop = threading.Event()
    for served, worker_device in (("cpu", "cuda"), ("cuda", "cpu")):
        path = tmp_path / served / "arena.sock"
        cuda = CudaExport(make_handle(), make_handle()) if served == "cuda" else None
        document = make_export(device=served, cuda=cuda,
                               weights_segment="" if cuda else "duoserve-x-1-weights",
                               kv_segment="" if cuda else "duoserve-x-1-kv").to_json()
        listener = listen_private(path)
        thread = threading.Thread(target=serve_socket, args=(listener, lambda d=document: d, ArenaMetrics(), stop))
        thread.start()
        try:
            with pytest.raises(ValueError, match=f"holds its memory on {served}, this worker runs on {worker_device}"):
                attach_arena(path, timeout=5, device=worker_device)
        finally:
            stop.set()
            thread.join()
            listener.close()
            stop.clear()


@pytest.mark.gpu
@pytest.mark.slow
def test_arena_on_cuda_exports_weights_a_worker_process_uses_in_place(tmp_path, default_model_dir):
    """`services.arena.main --device cuda`; a worker process attaches: weights equal a private load, the KV
    pool is the arena's memory (a write through one worker is read by another), nothing is copied."""
    from services.common.redis_server import start_redis_server
    socket_path = tmp_path / "run" / "arena.sock"
    with start_redis_server(tmp_path / "redis") as server:
        arena = subprocess.Popen(
            [sys.executable, "-m", "services.arena.main", "--model", str(default_model_dir), "--redis-url", server.url,
             "--stack-id", "gpu_test", "--socket", str(socket_path), "--port", "0", "--num-kv-blocks", "64",
             "--device", "cuda"], cwd=REPO, stderr=(tmp_path / "arena.log").open("w"))
        worker = textwrap.dedent("""
            import json, sys, torch
            from services.arena.client import attach_arena
            from services.engine.loader import load_engine_weights
            view = attach_arena(sys.argv[1], timeout=300, device="cuda")
            before = torch.cuda.memory_allocated()
            private = load_engine_weights(view.model_dir, view.model_config, torch.float32)
            same = all(torch.equal(view.weights[n].cpu(), private[n]) for n in private)
            kv = view.kv_cache
            if sys.argv[2] == "write":
                kv[0, 0, 5].fill_(3.5)
                torch.cuda.synchronize()
            print(json.dumps({"same": same, "device": str(kv.device), "allocated": before,
                              "kv05": kv[0, 0, 5].flatten()[0].item()}), flush=True)
        """)
        try:
            runs = []
            for mode in ("write", "read"):
                done = subprocess.run([sys.executable, "-c", worker, str(socket_path), mode], cwd=REPO,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stderr + (tmp_path / "arena.log").read_text()
                runs.append(json.loads(done.stdout.splitlines()[-1]))
        finally:
            arena.terminate()
            arena.wait(timeout=60)
    assert all(r["same"] and r["device"] == "cuda:0" and r["allocated"] == 0 for r in runs)
    assert runs[1]["kv05"] == 3.5          # the second worker reads what the first wrote: one KV pool
