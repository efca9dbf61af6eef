"""The Admin API through `duoctl`, against an in-process server over a stand-in controller."""
from __future__ import annotations

from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest

from duoserve import duoctl
from duoserve.v1 import admin_pb2_grpc
from orchestrator.admin import AdminServicer
from orchestrator.policy import PolicyMode, Shares
from services.common.shares import UnitSpace


class _Controller:
    """What AdminServicer.PinShares touches: the decision in force, and pin()."""

    def __init__(self) -> None:
        self.last = SimpleNamespace(shares=Shares(0.5, 0.5, 2048))     # the policy's last decision
        self.policy = SimpleNamespace(mode=PolicyMode.AUTO, pinned=None)
        self.pinned: Shares | None = None
        self.model = SimpleNamespace(units=UnitSpace.cpu(2))                 # what the shares are cut from

    def default_shares(self) -> Shares:
        return Shares(0.5, 0.5, 2048)

    def pin(self, shares: Shares) -> None:
        self.pinned = self.policy.pinned = shares
        self.policy.mode = PolicyMode.MANUAL


@pytest.fixture
def admin():
    controller = _Controller()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(controller, "cpu"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield controller, f"127.0.0.1:{port}"
    server.stop(None)


def test_share_set_prints_what_it_set(admin, capsys) -> None:
    controller, target = admin
    assert duoctl.main(["--target", target, "share", "set", "--prefill", "1.0", "--decode", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "prefill 1.00, decode 0.50, token budget 2048" in out and "policy manual" in out, out
    assert controller.pinned == Shares(1.0, 0.5, 2048)      # the budget kept from the decision in force

    assert duoctl.main(["--target", target, "share", "set", "--prefill", "0.25", "--decode", "1",
                        "--token-budget", "512"]) == 0
    assert "prefill 0.25, decode 1.00, token budget 512" in capsys.readouterr().out


def test_share_set_out_of_range_is_refused(admin, capsys) -> None:
    _, target = admin
    assert duoctl.main(["--target", target, "share", "set", "--prefill", "1.5", "--decode", "0.5"]) == 1
    assert "prefill" in capsys.readouterr().err


def test_status_shows_the_prefix_cache_hit_rate_and_cached_blocks() -> None:
    from duoserve.v1 import admin_pb2 as pb
    prefill = pb.WorkerStatus(phase="prefill", prefix_caching=True, prefix_query_tokens=4000, prefix_hit_tokens=3000)
    decode = pb.WorkerStatus(phase="decode", prefix_caching=True)          # admits nothing from the queue
    status = pb.StackStatus(workers=[prefill, decode], queue_waiting=2, queue_prompt_tokens=2400,
                            queue_uncached_tokens=600, kv_blocks_total=512, kv_blocks_free=500,
                            kv_blocks_cached=40, kv_blocks_evictable=30)
    lines = duoctl.format_status(status).splitlines()
    assert "queue 2 waiting (2,400 prompt tokens, 600 uncached); KV 12/512 blocks used" in lines
    assert ("prefix cache: 40 blocks cached (10 held by requests, 30 evictable); hit rate 75.0% of 4,000 "
            "prompt tokens looked up since the workers started") in lines
    header = next(line for line in lines if line.startswith("worker"))
    column = header.index("cache hit") + len("cache hit")
    assert [line[:column].split()[-1] for line in lines if line.startswith(("prefill", "decode"))] == ["75.0%", "-"]
    off = pb.StackStatus(workers=[pb.WorkerStatus(phase="prefill")])
    assert "prefix cache: off" in duoctl.format_status(off).splitlines()
