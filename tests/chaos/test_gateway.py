"""The gateway killed under load (issue 13): the supervisor restarts it under the same gateway id, the
new one adopts its predecessor's requests, SDK clients re-attach by themselves and lose nothing; a
request whose client never comes back is cancelled after the orphan timeout and its blocks come back.
A second gateway started outside the supervisor and killed for good: the stack's own gateway adopts its
requests when the clients re-attach there, and they lose nothing either.

One split stack, detached, supervised, as tests/chaos/test_kill.py's (whose helpers these tests use),
with a short orphan timeout (DUOSERVE_ORPHAN_TIMEOUT_S, read by the gateway's main).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

import duoserve
from duoserve import stack
from duoserve.reattach import REQUEST_ID_METADATA
from duoserve.stack import Mode, StackConfig
from duoserve.stack_procs import grpc_health, launch_process
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc as pb_grpc
from services.common.contracts import KeySpace
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512

ORPHAN_TIMEOUT_S = 10.0
MAX_TOKENS = 48


@dataclass(frozen=True)
class Outcome:
    token_ids: tuple[int, ...]
    text: str
    first_token_at: float | None        # time.monotonic() of the first chunk with tokens


def _sync_one(target: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> Outcome:
    ids, texts, first = [], [], None
    with duoserve.Client(target, timeout=300) as client:
        for chunk in client.stream(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
            first = first or (time.monotonic() if chunk.token_ids else None)
            ids += chunk.token_ids
            texts.append(chunk.text)
    return Outcome(tuple(ids), "".join(texts), first)


async def _async_one(client: duoserve.AsyncClient, prompt: list[int], max_tokens: int) -> Outcome:
    ids, texts, first = [], [], None
    async for chunk in client.stream(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
        first = first or (time.monotonic() if chunk.token_ids else None)
        ids += chunk.token_ids
        texts.append(chunk.text)
    return Outcome(tuple(ids), "".join(texts), first)


def _async_all(target: str, prompts: list[list[int]], max_tokens: int) -> list[Outcome]:
    async def main() -> list[Outcome]:
        async with duoserve.AsyncClient(target, timeout=300) as client:
            return list(await asyncio.gather(*(_async_one(client, p, max_tokens) for p in prompts)))
    return asyncio.run(main())


def _stream_all(target: str, prompts: list[list[int]], during=None, max_tokens: int = MAX_TOKENS) -> list[Outcome]:
    """The first half through blocking Clients (a thread each), the second through one AsyncClient."""
    half = len(prompts) // 2
    with concurrent.futures.ThreadPoolExecutor(half + 1) as pool:
        futures = [pool.submit(_sync_one, target, p, max_tokens) for p in prompts[:half]]
        futures.append(pool.submit(_async_all, target, prompts[half:], max_tokens))
        if during is not None:
            during()
        *sync, asynchronous = [f.result() for f in futures]
    return sync + asynchronous


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("chaos-gateway"), cache_dir=default_model_dir.parent,
                         name="chaos-gw", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300)
    with pytest.MonkeyPatch.context() as env:           # the supervisor, and so every restart, inherits it
        env.setenv("DUOSERVE_ORPHAN_TIMEOUT_S", str(ORPHAN_TIMEOUT_S))
        stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    assert stack.read_state(config.state_path) is None


def _kill_gateway(config: StackConfig) -> tuple[int, float]:
    """kill -9 of the gateway; -> its restarts so far and the time of the kill."""
    restarts = ops.status(config)["gateway"]["restarts"]
    os.kill(ops.record(config, "gateway").pid, signal.SIGKILL)
    return restarts, time.monotonic()


def test_sdk_streams_survive_a_killed_gateway(gateway_stack):
    target = ops.state(gateway_stack).gateway_target
    prompts = ops.prompts(12, 32) + ops.prompts(4, 600)       # the long ones may still wait for prefill at the kill
    expected = _stream_all(target, prompts)
    assert ops.wait_all_free(gateway_stack, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(gateway_stack)                   # the kill run computes its prompts cold
    times: list[float] = []

    def kill() -> None:
        time.sleep(2.5)                                  # every request accepted, most mid-generation
        restarts, killed_at = _kill_gateway(gateway_stack)
        times.append(killed_at)
        times.append(ops.wait_restarted(gateway_stack, "gateway", restarts + 1))

    got = _stream_all(target, prompts, during=kill)
    killed_at, serving_s = times
    done_s = time.monotonic() - killed_at
    waiting = sum(o.first_token_at is None or o.first_token_at > killed_at for o in got)
    print(f"gateway killed with 16 SDK streams in flight ({waiting} without a token yet): SERVING again "
          f"{serving_s:.1f} s after the kill, every stream re-attached and done {done_s:.1f} s after it",
          file=sys.stderr)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]   # no token twice, none missing
    assert [o.text for o in got] == [o.text for o in expected]             # and the text the same
    assert ops.wait_all_free(gateway_stack, NUM_BLOCKS) == NUM_BLOCKS    # nothing leaked


def _grpc_stream(target: str, request_id: str) -> tuple[grpc.Channel, object]:
    """A raw stub's Generate, read up to its first tokens: a client that will never re-attach."""
    channel = grpc.insecure_channel(target)
    call = pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
        request_id=request_id, token_ids=pb.TokenIds(ids=list(range(100, 132))),
        sampling=pb.SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)))
    first = next(call)
    assert first.request_id == request_id and dict(call.initial_metadata())[REQUEST_ID_METADATA] == request_id
    return channel, call


def _http_stream(url: str) -> http.client.HTTPConnection:
    """An OpenAI streaming completion, read up to its first event: HTTP clients cannot re-attach."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 4000,
                                                         "temperature": 0, "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return conn


def test_requests_whose_clients_never_come_back_are_cancelled_after_the_orphan_timeout(gateway_stack):
    state = ops.state(gateway_stack)
    channel, _call = _grpc_stream(state.gateway_target, "orphan-grpc")
    conn = _http_stream(state.http_url)
    assert ops.free_blocks(gateway_stack) < NUM_BLOCKS
    restarts, killed_at = _kill_gateway(gateway_stack)
    channel.close()
    conn.close()
    back_s = ops.wait_restarted(gateway_stack, "gateway", restarts + 1)
    free = ops.wait_all_free(gateway_stack, NUM_BLOCKS, timeout=ORPHAN_TIMEOUT_S + 30)
    freed_s = time.monotonic() - killed_at
    print(f"gateway back {back_s:.1f} s after the kill; the 2 orphans cancelled and their blocks free "
          f"{freed_s:.1f} s after it (orphan timeout {ORPHAN_TIMEOUT_S:g} s)", file=sys.stderr)
    assert free == NUM_BLOCKS
    log = Path(ops.record(gateway_stack, "gateway").log).read_text()
    assert "request orphan-grpc: no client re-attached" in log
    assert log.count("no client re-attached") >= 2                         # the HTTP one too
    with duoserve.Client(state.gateway_target, timeout=30) as client:
        attach = client._stub.Attach(pb.AttachRequest(request_id="orphan-grpc", num_received_tokens=1))
        with pytest.raises(grpc.RpcError) as e:
            next(attach)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "send it again" in e.value.details()


PEER_ID = "gw-peer-a"
PEER_MAX_TOKENS = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_peer_gateway(config: StackConfig, log: Path) -> tuple[subprocess.Popen, int]:
    """Another gateway of the stack, as `up` starts its own (its command line and environment) but on
    another port, under another gateway id, and outside the supervisor: once killed it stays dead."""
    record = ops.record(config, "gateway")
    port, argv = _free_port(), list(record.argv)
    for flag, value in (("--port", port), ("--metrics-port", 0), ("--http-port", 0)):
        argv[argv.index(flag) + 1] = str(value)
    env = {**dict(record.env), "DUOSERVE_ORPHAN_TIMEOUT_S": str(ORPHAN_TIMEOUT_S)}
    process = launch_process([*argv, "--gateway-id", PEER_ID], env, log)
    deadline = time.monotonic() + 180
    while grpc_health(f"127.0.0.1:{port}") != "SERVING":
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.25)
    return process, port


def _peer_keys(config: StackConfig) -> dict[str, int]:
    """What gateway PEER_ID's processes have in Redis (lease, records, reply stream, registry entry),
    with each record hash's length."""
    st = ops.state(config)
    keys = KeySpace(st.key_prefix)
    client = redis.Redis.from_url(st.redis_url)
    try:
        found = {k.decode(): 0 for k in client.scan_iter(f"{st.key_prefix}:*{PEER_ID}~*")}
        found.update({k: client.hlen(k) for k in found if k.endswith(":requests")})
        found.update({f"registry:{g.decode()}": 0 for g in client.hkeys(keys.gateways) if g.decode().startswith(PEER_ID)})
        return found
    finally:
        client.close()


def _ttl(config: StackConfig, key: str) -> int:
    client = redis.Redis.from_url(ops.state(config).redis_url)
    try:
        return int(client.pttl(key))
    finally:
        client.close()


def _peer_records(config: StackConfig) -> int:
    return sum(n for k, n in _peer_keys(config).items() if k.endswith(":requests"))


def test_sdk_streams_of_a_gateway_that_never_comes_back_complete_on_another(gateway_stack, tmp_path):
    """Gateway A (PEER_ID, unsupervised) takes the streams first (pick_first over A, B); killed for good,
    the SDK's channel goes on to B, the stack's own gateway, whose Attach adopts A's requests at once."""
    b_target = ops.state(gateway_stack).gateway_target
    prompts = ops.prompts(12, 32, offset=40)
    expected = _stream_all(b_target, prompts, max_tokens=PEER_MAX_TOKENS)
    assert ops.wait_all_free(gateway_stack, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(gateway_stack)                   # the kill run computes its prompts cold
    peer, a_port = _start_peer_gateway(gateway_stack, tmp_path / "gateway-a.log")
    times: list[float] = []
    try:
        both = f"ipv4:127.0.0.1:{a_port},{b_target}"       # pick_first: A while it answers, then B
        channel, _call = _grpc_stream(f"127.0.0.1:{a_port}", "peer-orphan")   # a client that never comes back

        def kill() -> None:
            deadline = time.monotonic() + 120
            while _peer_records(gateway_stack) < len(prompts) + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)                                  # every request accepted by A, most mid-generation
            times.append(_peer_records(gateway_stack))
            peer.kill()
            times.append(time.monotonic())
            times.append(time.time())
            channel.close()

        got = _stream_all(both, prompts, during=kill, max_tokens=PEER_MAX_TOKENS)
    finally:
        peer.kill()
        peer.wait()
    had_records, killed_at, killed_wall = times
    done_s = time.monotonic() - killed_at
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]   # no token twice, none missing
    assert [o.text for o in got] == [o.text for o in expected]
    free = ops.wait_all_free(gateway_stack, NUM_BLOCKS, timeout=ORPHAN_TIMEOUT_S + 30)   # the orphan's too
    freed_s = time.monotonic() - killed_at
    b_log = Path(ops.record(gateway_stack, "gateway").log).read_text()
    print(f"gateway A killed for good with {had_records} requests in flight (12 SDK streams, 1 orphan): every "
          f"stream re-attached to B and done {done_s:.1f} s after the kill; all blocks free {freed_s:.1f} s after "
          "it", file=sys.stderr)
    assert free == NUM_BLOCKS
    adopted = re.search(rf"(\S+ \S+) gateway WARNING gateway {PEER_ID}~\w+ is dead: took over its {had_records} "
                        r"requests in flight \(at once\)", b_log)
    assert adopted, b_log[-3000:]
    adopted_s = time.mktime(time.strptime(adopted[1].split(",")[0], "%Y-%m-%d %H:%M:%S")) + \
        int(adopted[1].split(",")[1]) / 1000 - killed_wall
    print(f"B adopted A's {had_records} requests {adopted_s:.2f} s after the kill (the first Attach)", file=sys.stderr)
    assert "request peer-orphan: no client re-attached" in b_log
    deadline = time.monotonic() + 10
    while (left := _peer_keys(gateway_stack)) and any(not k.startswith(f"{ops.state(gateway_stack).key_prefix}:reply:")
                                                      for k in left) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(":reply:" in k for k in left) and len(left) <= 1   # A's keys deleted once its requests ended,
    assert all(_ttl(gateway_stack, k) > 0 for k in left)          # its reply stream expiring (a last delivery)
