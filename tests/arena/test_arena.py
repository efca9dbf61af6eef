"""The arena as a real process on the default model, with a real redis-server and real worker processes.

One arena serves the module: two workers attach to it, check the weights against a private load,
pass a KV write from one to the other, and are measured (PSS) against a process that loads the
model privately. The last tests stop it with SIGTERM, and SIGKILL a second arena.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.arena.client import attach_arena
from services.common.contracts import KeySpace
from services.common.model_info import read_model_info
from services.common.shm import list_segments, reclaim_segments
from services.engine.kv_cache import KVCacheSpec
from services.engine.loader import load_engine_weights
from services.engine.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
NUM_KV_BLOCKS = 512                 # 360 MiB for the default model: one full 8192-token context
START_TIMEOUT_S = 300.0

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


# ---------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pss_kib(pid: int) -> dict[str, int]:
    """Pss and its parts (kB) from /proc/<pid>/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Pss"):
            out[key] = int(value.split()[0])
    return out


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status


class Arena:
    """`python -m services.arena.main` in a subprocess."""

    def __init__(self, tmp: Path, model_dir: Path, redis_url: str, num_kv_blocks: int, stack_id: str = "") -> None:
        self.stack_id = stack_id or f"t{uuid.uuid4().hex[:10]}"
        self.prefix = f"duoserve-{self.stack_id}-"
        self.key_prefix = f"test:{self.stack_id}"
        self.socket_path = tmp / "run" / "arena.sock"
        self.port, self.metrics_port = free_port(), free_port()
        self.log = tmp / "arena.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.arena.main", "--model", str(model_dir), "--redis-url", redis_url,
             "--key-prefix", self.key_prefix, "--stack-id", self.stack_id, "--socket", str(self.socket_path),
             "--port", str(self.port), "--metrics-port", str(self.metrics_port),
             "--num-kv-blocks", str(num_kv_blocks)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"arena exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if health_status(self.port) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"arena not SERVING after {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        reclaim_segments(self.prefix)


class Child:
    """A Python subprocess speaking JSON lines on stdin/stdout."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"child {self.proc.pid} exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


WORKER = """
    import hashlib, json, sys, torch
    torch.set_num_threads(1)
    from services.arena.client import attach_arena

    view = attach_arena(sys.argv[1], timeout=60.0)
    # Hashing reads every byte of every weight: the whole weights segment is now mapped in this process.
    digests = {name: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
               for name, t in view.weights.items()}
    storages = {t.untyped_storage().data_ptr() for t in view.weights.values()}
    print(json.dumps({"digests": digests, "num_storages": len(storages),
                      "kv_shape": list(view.kv_cache.shape), "arena_pid": view.arena_pid}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        block = view.kv_cache[cmd["layer"], :, cmd["block"]]          # K and V of one block in one layer
        if cmd["op"] == "write":
            block.fill_(cmd["value"])
        print(json.dumps({"min": float(block.min()), "max": float(block.max())}), flush=True)
"""

PRIVATE = """
    import ctypes, gc, json, sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from services.engine.kv_cache import KVCacheSpec, allocate_kv_pool
    from services.engine.loader import load_engine_weights
    from services.engine.model_config import ModelConfig

    config = ModelConfig.from_dir(sys.argv[1])
    weights = load_engine_weights(Path(sys.argv[1]), config, torch.float32)
    kv = allocate_kv_pool(KVCacheSpec.for_model(config, 16, torch.float32, num_blocks=int(sys.argv[2])))
    checksum = sum(float(t.sum(dtype=torch.float64)) for t in weights.values()) + float(kv.sum())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)       # the loader's freed temporaries back to the OS, as the arena does
    print(json.dumps({"checksum": checksum}), flush=True)
    sys.stdin.readline()
"""


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A private redis-server (services.common.redis_server when present, else started here)."""
    directory = tmp_path_factory.mktemp("redis")
    try:
        from services.common.redis_server import start_redis_server
    except ImportError:
        start_redis_server = None
    if start_redis_server is not None:
        with start_redis_server(directory) as server:
            yield server.url
        return
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--daemonize", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def arena(tmp_path_factory, default_model_dir, redis_url):
    a = Arena(tmp_path_factory.mktemp("arena"), default_model_dir, redis_url, NUM_KV_BLOCKS)
    try:
        a.wait_serving()
        yield a
    finally:
        a.stop()


# ---------------------------------------------------------------------------------------------- tests

def test_arena_exports_its_memory_and_publishes_the_model(arena, redis_url, default_model_dir):
    assert sorted(list_segments(arena.prefix)) == [f"{arena.prefix}{arena.proc.pid}-kv",
                                                   f"{arena.prefix}{arena.proc.pid}-record",
                                                   f"{arena.prefix}{arena.proc.pid}-weights"]
    assert oct(arena.socket_path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(arena.socket_path.parent.stat().st_mode & 0o777) == oct(0o700)

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = KeySpace(arena.key_prefix).model_info
    fields = client.hgetall(key)
    config = ModelConfig.from_dir(default_model_dir)
    assert fields["model_dir"] == str(default_model_dir) and fields["architecture"] == config.architecture
    assert int(fields["num_layers"]) == config.num_layers and int(fields["num_kv_heads"]) == config.num_kv_heads
    assert int(fields["head_dim"]) == config.head_dim and int(fields["num_kv_blocks"]) == NUM_KV_BLOCKS
    assert int(fields["max_position"]) == config.max_position and int(fields["vocab_size"]) == config.vocab_size
    assert json.loads(fields["eos_token_ids"]) == list(config.eos_token_ids) and fields["dtype"] == "float32"
    info = read_model_info(client, key)                                  # what the gateway reads
    assert (info.mode, info.num_kv_blocks, info.block_size) == ("split", NUM_KV_BLOCKS, 16)

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{arena.metrics_port}/metrics", timeout=5).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("duoserve:")}
    shm = {n.rsplit("-", 1)[1]: os.path.getsize(f"/dev/shm/{n}") for n in list_segments(arena.prefix)}
    assert values["duoserve:arena_weights_bytes"] == shm["weights"]
    assert values["duoserve:arena_kv_bytes"] == shm["kv"] == NUM_KV_BLOCKS * 16 * config.kv_elements_per_token * 4


def test_two_workers_share_the_weights_and_the_kv_pool_in_less_memory(arena, default_model_dir, capsys):
    workers = [Child(WORKER, str(arena.socket_path)) for _ in range(2)]
    private = None
    try:
        hello = [w.read() for w in workers]
        # Same bytes as a private load of the checkpoint, in one storage (the segment) per worker.
        config = ModelConfig.from_dir(default_model_dir)
        reference = load_engine_weights(default_model_dir, config, torch.float32)
        expected = {name: hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
                    for name, t in reference.items()}
        del reference
        for h in hello:
            assert h["digests"] == expected
            assert h["num_storages"] == 1 and h["arena_pid"] == arena.proc.pid
            assert h["kv_shape"] == list(KVCacheSpec.for_model(config, 16, torch.float32, NUM_KV_BLOCKS).shape)

        # A KV write by one worker is read by the other (and by a third mapping, this process's).
        a, b = workers
        block = NUM_KV_BLOCKS - 2
        assert b.ask(op="read", layer=7, block=block) == {"min": 0.0, "max": 0.0}
        assert a.ask(op="write", layer=7, block=block, value=0.625) == {"min": 0.625, "max": 0.625}
        assert b.ask(op="read", layer=7, block=block) == {"min": 0.625, "max": 0.625}
        assert b.ask(op="read", layer=7, block=block + 1) == {"min": 0.0, "max": 0.0}
        view = attach_arena(arena.socket_path, timeout=10)
        assert torch.all(view.kv_cache[7, :, block] == 0.625)
        b.ask(op="write", layer=7, block=block, value=0.0)
        view.close()
        del view

        # Memory: arena + two attached workers against one process holding the same model privately.
        private = Child(PRIVATE, str(default_model_dir), str(NUM_KV_BLOCKS))
        private.read()
        split = {"arena": pss_kib(arena.proc.pid), "worker a": pss_kib(a.proc.pid), "worker b": pss_kib(b.proc.pid)}
        alone = pss_kib(private.proc.pid)
        total = sum(p["Pss"] for p in split.values())
        with capsys.disabled():
            for name, p in {**split, "private": alone}.items():
                print(f"\n  PSS {name:9s} {p['Pss'] / 1024:7.1f} MiB (anon {p['Pss_Anon'] / 1024:6.1f}, "
                      f"file {p['Pss_File'] / 1024:5.1f}, shmem {p['Pss_Shmem'] / 1024:6.1f})", end="")
            print(f"\n  arena + 2 workers {total / 1024:.1f} MiB = {total / alone['Pss']:.2f}x one private process")
        assert total < 1.5 * alone["Pss"]
    finally:
        for child in (*workers, *([private] if private else [])):
            child.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_reach_the_socket(arena):
    pid = os.fork()
    if pid == 0:                                         # child: become nobody, try to attach
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(arena.socket_path))
                code = 1 if s.recv(1) else 0            # connected but got nothing: the uid check closed it
        except PermissionError:
            code = 0                                     # the 0700 directory keeps other users out
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_sigterm_unlinks_the_segments_and_the_socket(arena):
    assert list_segments(arena.prefix) and arena.socket_path.exists()
    arena.proc.send_signal(signal.SIGTERM)
    assert arena.proc.wait(timeout=60) == 0
    assert list_segments(arena.prefix) == []
    assert not arena.socket_path.exists()


def test_sigkill_leaves_segments_that_reclaim_removes(tmp_path, default_model_dir, redis_url):
    killed = Arena(tmp_path, default_model_dir, redis_url, num_kv_blocks=16)
    try:
        view = attach_arena(killed.socket_path, timeout=START_TIMEOUT_S)   # waits while the arena loads
        assert view.arena_pid == killed.proc.pid
        killed.proc.kill()
        killed.proc.wait()
        left = list_segments(killed.prefix)
        assert len(left) == 3 and killed.socket_path.exists()                # weights, kv, record
        assert float(view.weights["norm"].sum()) != 0.0                   # still mapped here after the owner died
        with pytest.raises(TimeoutError):
            attach_arena(killed.socket_path, timeout=0.5)                 # a stale socket: nobody answers
        assert sorted(reclaim_segments(killed.prefix)) == left
        assert list_segments(killed.prefix) == []
        view.close()
    finally:
        killed.stop()


def _inodes(prefix: str) -> dict[str, tuple[int, int]]:
    """kind -> (owner pid, inode) of each segment under `prefix`."""
    found = {}
    for name in list_segments(prefix):
        owner, kind = name[len(prefix):].split("-")
        found[kind] = (int(owner), os.stat(f"/dev/shm/{name}").st_ino)
    return found


def test_a_restarted_arena_reopens_the_segments_in_place(tmp_path, default_model_dir, redis_url):
    """SIGKILL, then an arena of the same stack: it serves the same memory (a worker mapping it goes
    on, the KV as it was); one made for another pool size makes new segments and unlinks the old."""
    first = Arena(tmp_path, default_model_dir, redis_url, num_kv_blocks=16)
    arenas = [first]
    try:
        view = attach_arena(first.socket_path, timeout=START_TIMEOUT_S)
        view.kv_cache[1, :, 3].fill_(7.0)                                 # a request's KV, written by a worker
        before = _inodes(first.prefix)
        first.proc.kill()
        first.proc.wait()
        second = Arena(tmp_path, default_model_dir, redis_url, num_kv_blocks=16, stack_id=first.stack_id)
        arenas.append(second)
        second.wait_serving()
        after = _inodes(first.prefix)
        assert {k: ino for k, (_, ino) in after.items()} == {k: ino for k, (_, ino) in before.items()}
        assert {owner for owner, _ in after.values()} == {second.proc.pid} and len(after) == 3
        assert "re-opened the segments" in second.log.read_text()
        again = attach_arena(second.socket_path, timeout=30)
        assert again.arena_pid == second.proc.pid
        assert again.memory_id == view.memory_id != ""                      # the same memory: hand-offs resume
        assert float(again.kv_cache[1, :, 3].min()) == 7.0                  # the KV as the workers left it
        view.kv_cache[0, :, 5].fill_(3.0)                                   # the old mapping is the same memory
        assert float(again.kv_cache[0, :, 5].max()) == 3.0
        assert torch.equal(again.weights["norm"], view.weights["norm"])
        again.close()

        second.proc.kill()
        second.proc.wait()
        third = Arena(tmp_path, default_model_dir, redis_url, num_kv_blocks=32, stack_id=first.stack_id)
        arenas.append(third)
        third.wait_serving()
        fresh = _inodes(first.prefix)
        assert {owner for owner, _ in fresh.values()} == {third.proc.pid} and len(fresh) == 3
        assert fresh["kv"][1] != after["kv"][1]
        assert "not re-opening the segments of dead arena" in third.log.read_text()
        renewed = attach_arena(third.socket_path, timeout=30)
        assert renewed.memory_id not in ("", view.memory_id)                # new memory: decode recomputes
        renewed.close()
        assert float(view.kv_cache[1, :, 3].min()) == 7.0                   # unlinked, still mapped here
        view.close()
    finally:
        for arena in arenas:
            arena.stop()


def test_sigterm_while_loading_exits_cleanly(tmp_path, default_model_dir, redis_url):
    starting = Arena(tmp_path, default_model_dir, redis_url, num_kv_blocks=16)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "loading" not in starting.log.read_text():                  # health is up, the load has begun
            assert starting.proc.poll() is None and time.monotonic() < deadline, starting.log.read_text()
            time.sleep(0.05)
        starting.proc.send_signal(signal.SIGTERM)
        assert starting.proc.wait(timeout=60) == 0, starting.log.read_text()
        assert list_segments(starting.prefix) == [] and not starting.socket_path.exists()
    finally:
        starting.stop()
