"""The stack's Redis killed under load (issue 13): every process reconnects and nothing is lost.

A split stack of its own, detached and supervised as `duoserve up --detach` leaves it. Redis is
killed with SIGKILL while 16 greedy requests run (mostly in prefill, or mostly in decode); the
supervisor restarts it from its append-only file. Every request then completes with the tokens of a run without the kill, every KV block is back
(and the pool passes its audit), and only Redis shows a restart in `duoserve status`: the workers,
the gateway and the orchestrator reconnected. The second test holds the restart (the supervisor is
paused with SIGSTOP) to see the gateway while Redis is away: NOT_SERVING, /health 503, new requests
UNAVAILABLE, streams in flight paused and then finished once Redis is back.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import urllib.error
import urllib.request

import grpc
import pytest
import redis

from duoserve import stack
from duoserve.stack import Mode, StackConfig
from duoserve.stack_procs import grpc_health
from duoserve.v1 import generation_pb2, generation_pb2_grpc
from services.common.contracts import KeySpace
from services.common.redis_blocks import RedisBlockAllocator
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512
PROMPT_TOKENS = 200          # the held restart: some requests still in prefill when Redis goes,
MAX_TOKENS = 32              # the others mid-generation in decode
OTHERS = ("arena", "prefill", "decode", "gateway", "orchestrator")


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("chaos-redis"), cache_dir=default_model_dir.parent,
                         name="chaos-redis", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    assert stack.read_state(config.state_path) is None


def _restarts(config: StackConfig) -> dict[str, int]:
    return {name: p["restarts"] for name, p in ops.status(config).items()}


def _wait_health(target: str, wanted: str, timeout: float = 60.0) -> float:
    """Seconds until the gateway's grpc.health.v1 says `wanted`."""
    started = time.monotonic()
    while (health := grpc_health(target, 1.0)) != wanted:
        assert time.monotonic() - started < timeout, f"gateway {health}, not {wanted}, after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _audit(config: StackConfig):
    state = ops.state(config)
    client = redis.Redis.from_url(state.redis_url)
    try:
        return RedisBlockAllocator(client, KeySpace(state.key_prefix)).audit()
    finally:
        client.close()


def _assert_pool_whole(config: StackConfig) -> None:
    assert ops.wait_all_free(config, NUM_BLOCKS) == NUM_BLOCKS                 # nothing leaked
    audit = _audit(config)
    assert audit.is_consistent and audit.owners == 0


@pytest.mark.parametrize("where, prompt_tokens, max_tokens, after_s", [
    pytest.param("prefill", 600, 12, 1.5,   # most requests queued in prefill or being prefilled
                 marks=pytest.mark.chaos_long),
    ("decode", 32, 64, 3.0),        # most requests mid-generation in decode
])
def test_a_killed_redis_is_restarted_and_every_request_completes_unchanged(redis_stack, where, prompt_tokens,
                                                                           max_tokens, after_s):
    target = ops.state(redis_stack).gateway_target
    prompts = ops.prompts(16, prompt_tokens)
    expected = ops.generate_all(target, prompts, max_tokens=max_tokens)
    _assert_pool_whole(redis_stack)
    ops.reset_prefix_cache(redis_stack)                   # the kill run computes its prompts cold
    before = _restarts(redis_stack)
    times: dict[str, float] = {}

    def kill() -> None:
        time.sleep(after_s)
        os.kill(ops.record(redis_stack, "redis").pid, signal.SIGKILL)
        times["killed"] = time.monotonic()
        times["not serving"] = _wait_health(target, "NOT_SERVING", timeout=10) if grpc_health(target) != "NOT_SERVING" else 0.0
        times["serving"] = _wait_health(target, "SERVING")

    got = ops.generate_all(target, prompts, during=kill, max_tokens=max_tokens)
    done_s = time.monotonic() - times["killed"]
    print(f"redis killed ({where}): gateway NOT_SERVING after {times['not serving']:.1f} s, SERVING again "
          f"{times['serving']:.1f} s later; 16 requests done {done_s:.1f} s after the kill", file=sys.stderr)
    assert got == expected                                   # one stream each: no token missing or twice
    after = _restarts(redis_stack)
    assert after["redis"] == before["redis"] + 1
    assert {n: after[n] for n in OTHERS} == {n: before[n] for n in OTHERS}   # they reconnected
    _assert_pool_whole(redis_stack)


def _generate_refused(target: str) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[100, 101, 102]))
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=10))
    return refused.value


def _http_health(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_while_redis_is_away_the_gateway_is_not_serving_and_streams_wait(redis_stack):
    state = ops.state(redis_stack)
    target, supervisor = state.gateway_target, state.supervisor_pid
    assert supervisor is not None
    prompts = ops.prompts(8, PROMPT_TOKENS)
    expected = ops.generate_all(target, prompts, max_tokens=MAX_TOKENS)
    ops.wait_all_free(redis_stack, NUM_BLOCKS)
    ops.reset_prefix_cache(redis_stack)                   # the kill run computes its prompts cold
    before = _restarts(redis_stack)
    seen: dict[str, object] = {}

    def kill_and_hold() -> None:
        time.sleep(1.0)
        os.kill(supervisor, signal.SIGSTOP)              # holds the restart: nothing else watches
        try:
            os.kill(ops.record(redis_stack, "redis").pid, signal.SIGKILL)
            seen["not serving"] = _wait_health(target, "NOT_SERVING", timeout=10)
            seen["http"] = _http_health(state.http_url)
            seen["refused"] = _generate_refused(target)
            time.sleep(5.0)                              # streams wait; the workers must not exit meanwhile
            seen["alive"] = all(ops.record(redis_stack, n).pid and os.path.exists(f"/proc/{ops.record(redis_stack, n).pid}")
                                for n in OTHERS)
            seen["still not serving"] = grpc_health(target)
        finally:
            os.kill(supervisor, signal.SIGCONT)
        seen["serving"] = _wait_health(target, "SERVING")

    got = ops.generate_all(target, prompts, during=kill_and_hold, max_tokens=MAX_TOKENS)
    refused = seen["refused"]
    print(f"redis away: NOT_SERVING after {seen['not serving']:.1f} s; SERVING {seen['serving']:.1f} s after "
          f"the supervisor went on; refused with {refused.code().name}: {refused.details()}", file=sys.stderr)
    assert seen["http"] == 503 and seen["still not serving"] == "NOT_SERVING" and seen["alive"]
    assert refused.code() is grpc.StatusCode.UNAVAILABLE and "Redis is unreachable" in refused.details()
    assert got == expected                               # paused, then finished: nothing lost
    after = _restarts(redis_stack)
    assert after["redis"] == before["redis"] + 1
    assert {n: after[n] for n in OTHERS} == {n: before[n] for n in OTHERS}
    assert _http_health(state.http_url) == 200
    _assert_pool_whole(redis_stack)
