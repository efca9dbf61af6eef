"""KvWriteOrder (services/worker/fence.py): the hand-off's device event on CUDA, the host fence elsewhere.

There is no GPU here: the CUDA side runs against a FAKE device event that records what the driver
would be asked (record on prefill's stream, wait on decode's); the real driver calls are the `gpu`
tests in tests/common/test_cuda_driver.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from services.common.contracts import Handoff, from_json, to_json
from services.engine.sampling_params import SamplingParams
from services.worker.fence import KvWriteOrder


@dataclass
class FakeEvent:
    """Stands in for cuda_driver.IpcEvent: no GPU on CI. Logs (call, stream) pairs."""

    handle: bytes
    calls: list = field(default_factory=list)

    def record(self, stream: int) -> None:
        self.calls.append(("record", stream))

    def wait(self, stream: int) -> None:
        self.calls.append(("wait", stream))


def _fake_device(created: list, opened: dict):
    def create(ordinal: int) -> FakeEvent:
        event = FakeEvent(bytes([7]) * 64)
        created.append(event)
        return event

    def open_event(raw: bytes, ordinal: int) -> FakeEvent:
        opened[raw] = opened.get(raw) or FakeEvent(raw)
        return opened[raw]
    return create, open_event


def test_cpu_pool_is_fenced_on_the_host_and_handoffs_carry_no_event():
    order = KvWriteOrder.for_worker(torch.zeros(4), publishes_handoffs=True)
    order.writes_done()
    order.before_reads("")
    assert order.handle == ""


def test_prefill_records_after_its_writes_and_decode_waits_on_its_stream():
    created, opened = [], {}
    create, open_event = _fake_device(created, opened)
    pool = torch.empty(0, device="meta")            # stands for the CUDA pool of the fake device
    prefill = KvWriteOrder(pool, by_event=True, create_event=create, open_event=open_event,
                           stream_of=lambda d: 11, on_cuda=True)
    decode = KvWriteOrder(pool, by_event=False, open_event=open_event, stream_of=lambda d: 22, on_cuda=True)
    prefill.writes_done()
    prefill.writes_done()
    assert created[0].calls == [("record", 11), ("record", 11)]
    assert prefill.handle == (bytes([7]) * 64).hex()
    for _ in range(3):
        decode.before_reads(prefill.handle)
    assert len(opened) == 1                          # opened once, waited on for every hand-off
    assert opened[bytes([7]) * 64].calls == [("wait", 22)] * 3


def test_an_event_that_cannot_be_opened_is_tried_once_and_reads_go_on():
    def broken(raw: bytes, ordinal: int):
        from services.common.cuda_driver import CudaDriverError
        broken.tries += 1
        raise CudaDriverError("writer gone")
    broken.tries = 0
    decode = KvWriteOrder(torch.empty(0, device="meta"), by_event=False, open_event=broken, on_cuda=True)
    decode.before_reads("ab" * 64)
    decode.before_reads("ab" * 64)
    assert broken.tries == 1


def test_a_malformed_handle_is_not_a_crash():
    decode = KvWriteOrder(torch.empty(0, device="meta"), by_event=False, on_cuda=True)
    decode.before_reads("not hex")                   # logged; the writer's host sync still ordered it


def test_the_handoff_carries_the_event_and_an_older_one_reads_as_host_fenced():
    handoff = Handoff("r1", (4,), (1, 2), (9,), 2, SamplingParams(max_tokens=3), "s", 1.0, 2.0,
                      kv_memory="m", kv_ready_event="ab" * 64)
    assert from_json(Handoff, to_json(handoff)) == handoff
    data = json.loads(to_json(handoff))
    del data["kv_ready_event"]
    assert from_json(Handoff, json.dumps(data)).kv_ready_event == ""


@pytest.mark.gpu
def test_on_a_gpu_decode_waits_for_prefills_writes_through_the_handoffs_event():
    import subprocess
    import sys
    pool = torch.zeros(1024, device="cuda:0")
    prefill = KvWriteOrder.for_worker(pool, publishes_handoffs=True)
    assert len(prefill.handle) == 128                  # by event: cuda-python is there
    torch.cuda._sleep(200_000_000)                     # ~0.1 s of GPU time, then the "KV write"
    pool.fill_(3.0)
    prefill.writes_done()
    child = ("import sys, torch\nfrom services.worker.fence import KvWriteOrder\n"
             "pool = torch.zeros(1, device='cuda:0')\norder = KvWriteOrder.for_worker(pool, publishes_handoffs=False)\n"
             "order.before_reads(sys.argv[1])\nev = torch.cuda.Event()\nev.record()\nev.synchronize()\n"
             "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", child, prefill.handle], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "ok"
