"""Retune by green context (services/worker/green.py, `--retune-mode green`).

There is no GPU here: GreenRetune runs against a FAKE of cuda_driver.GreenShares and of torch's
stream calls that records what would be asked of them. The real partitions and a forward pass on a
green stream are the `gpu` test at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.common.shares import UnitSpace, pick_partition
from services.worker.config import Phase, WorkerConfig, parse_args
from services.worker.green import DEFAULT_GREEN_SHARES, GreenRetune, parse_green_shares


@dataclass
class FakePartition:
    sm_count: int
    stream_handle: int


@dataclass
class FakeGreenShares:
    """Stands in for cuda_driver.GreenShares (no GPU on CI): partitions at fixed SM counts."""

    partitions: list
    closed: bool = False

    def for_units(self, units: int) -> FakePartition:
        return self.partitions[pick_partition([p.sm_count for p in self.partitions], units)]

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeTorch:
    """Logs the stream calls torch.cuda would get (no GPU on CI)."""

    calls: list = field(default_factory=list)

    def ops(self):
        return (lambda handle: ("stream", handle), lambda s: self.calls.append(("set", s)),
                lambda: self.calls.append(("drain",)))


def _retune(torch_fake: FakeTorch) -> tuple[GreenRetune, FakeGreenShares]:
    green = FakeGreenShares([FakePartition(40, 0xA), FakePartition(66, 0xB), FakePartition(132, 0xC)])
    return GreenRetune(green, UnitSpace.cuda(132), torch_fake.ops()), green


def test_a_share_runs_on_the_smallest_partition_holding_its_sms_after_the_old_stream_drains():
    fake = FakeTorch()
    retune, green = _retune(fake)
    switch = retune.apply(0.5)                      # 66 SMs
    assert switch.sm_count == 66 and retune.current_sms == 66
    assert fake.calls == [("drain",), ("set", ("stream", 0xB))]
    assert retune.apply(0.3).sm_count == 40         # 39.6 -> 38 SMs (TPCs) -> the 40-SM partition
    assert retune.apply(0.9).sm_count == 132


def test_the_same_partition_again_is_not_a_switch():
    fake = FakeTorch()
    retune, _ = _retune(fake)
    retune.apply(0.45)
    calls = len(fake.calls)
    assert retune.apply(0.48).sm_count == 66 and len(fake.calls) == calls


def test_close_drains_and_destroys_the_partitions():
    fake = FakeTorch()
    retune, green = _retune(fake)
    retune.close()
    assert green.closed and fake.calls == [("drain",)]


def test_green_shares_parse_and_refuse_what_is_not_a_fraction():
    assert parse_green_shares("1,0.25, 0.5") == (0.25, 0.5, 1.0)
    for bad in ("", "0", "1.5", "half"):
        with pytest.raises(ValueError):
            parse_green_shares(bad)
    assert DEFAULT_GREEN_SHARES[-1] == 1.0


def _config(**overrides) -> WorkerConfig:
    return WorkerConfig(**{"phase": Phase.DECODE, "redis_url": "redis://x", "key_prefix": "duo", "port": 1,
                           "metrics_port": 2, "arena_socket": Path("/tmp/a"), "model": None,
                           "cache_dir": Path("/tmp"), **overrides})


def test_green_mode_needs_cuda_and_no_mps_cap():
    assert _config(retune_mode="green", device="cuda").retune_mode == "green"
    assert _config(retune_mode="green", device="cuda", mps_percentage=100).retune_mode == "green"
    for bad in ({"device": "cpu"}, {"device": "cuda", "mps_percentage": 50}):
        with pytest.raises(ValueError, match="green"):
            _config(retune_mode="green", **bad)


def test_the_worker_flags_take_green_mode_and_its_shares():
    config = parse_args(Phase.DECODE, ["--redis-url", "redis://x", "--port", "1", "--arena-socket", "/tmp/a",
                                       "--device", "cuda", "--retune-mode", "green", "--green-shares", "0.3,0.6,1"])
    assert (config.retune_mode, config.green_shares) == ("green", (0.3, 0.6, 1.0))


@pytest.mark.gpu
def test_on_a_gpu_a_forward_on_a_green_stream_matches_the_default_stream():
    import torch
    a = torch.randn(512, 512, device="cuda:0")
    expected = a @ a
    retune = GreenRetune.create((0.25, 1.0))
    try:
        switch = retune.apply(0.25)
        assert 0 < switch.sm_count < torch.cuda.get_device_properties(0).multi_processor_count
        assert torch.allclose(a @ a, expected)
    finally:
        retune.close()
        torch.cuda.set_stream(torch.cuda.default_stream(0))
