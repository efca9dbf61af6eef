"""Real processes killed under load (issue 13): the supervisor restarts them and nothing is lost.

One split stack, detached, supervised as `duoserve up --detach` leaves it. Each test: requests in
flight, `kill -9` of one process, nothing else touched; then every request completes with the tokens
of a run without the kill, every KV block is back, and the restart shows in `duoserve status`.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import signal
import sys
import time

import pytest
import redis

import duoserve
from duoserve import stack
from duoserve.stack import Mode, StackConfig
from services.common.contracts import KeySpace

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512
PROMPT_TOKENS = 600          # long enough that prefill holds several prompts when it is killed
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("chaos"), cache_dir=default_model_dir.parent,
                         name="chaos", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    state = stack.read_state(config.state_path)
    assert state is None


def _state(config: StackConfig) -> stack.StackState:
    return stack.read_state(config.state_path)


def _record(config: StackConfig, name: str) -> stack.ProcessRecord:
    return next(r for r in _state(config).processes if r.name == name)


def _status(config: StackConfig) -> dict[str, dict]:
    out = io.StringIO()
    stack.status(config.state_dir, config.name, as_json=True, out=out)
    return {p["name"]: p for p in json.loads(out.getvalue())["processes"]}


def _wait_restarted(config: StackConfig, name: str, restarts: int, timeout: float = 240.0) -> float:
    """Seconds until `name` has been restarted `restarts` times and every process is SERVING."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        procs = _status(config)
        if procs[name]["restarts"] >= restarts and all(p["health"] == "SERVING" for p in procs.values()):
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{name} not restarted and SERVING after {timeout} s: {_status(config)}")


def _prompts(n: int, length: int = PROMPT_TOKENS) -> list[list[int]]:
    return [[100 + (7 * i + k) % 2000 for k in range(length)] for i in range(n)]


def _generate_all(target: str, prompts: list[list[int]], during=None,
                  max_tokens: int = MAX_TOKENS) -> list[tuple[int, ...]]:
    """Greedy requests, all in flight at once; `during()` runs once they are submitted."""
    def one(prompt: list[int]) -> tuple[int, ...]:
        with duoserve.Client(target, timeout=300) as client:
            return client.generate(token_ids=prompt, max_tokens=max_tokens, temperature=0,
                                   ignore_eos=True).token_ids

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        if during is not None:
            during()
        return [f.result() for f in futures]


def _free_blocks(config: StackConfig) -> int:
    state = _state(config)
    client = redis.Redis.from_url(state.redis_url)
    try:
        return int(client.llen(KeySpace(state.key_prefix).kv_free))
    finally:
        client.close()


def _wait_all_free(config: StackConfig, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while (free := _free_blocks(config)) != NUM_BLOCKS and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


def test_a_killed_orchestrator_is_restarted(chaos_stack):
    old = _record(chaos_stack, "orchestrator")
    os.kill(old.pid, signal.SIGKILL)
    recovery_s = _wait_restarted(chaos_stack, "orchestrator", 1)
    print(f"orchestrator back in {recovery_s:.1f} s", file=sys.stderr)
    assert _record(chaos_stack, "orchestrator").pid != old.pid
    with duoserve.Client(_state(chaos_stack).gateway_target, timeout=120) as client:
        assert client.generate(prompt="The capital of France is", max_tokens=4, temperature=0).token_ids


@pytest.mark.parametrize("victim, prompt_tokens, max_tokens, after_s", [
    ("prefill", PROMPT_TOKENS, MAX_TOKENS, 1.5),   # a few prompts handed off, the rest queued in prefill
    ("decode", 32, 64, 3.0),                       # every request mid-generation in decode
])
def test_a_worker_killed_with_requests_in_flight_loses_nothing(chaos_stack, victim, prompt_tokens, max_tokens,
                                                                after_s):
    target = _state(chaos_stack).gateway_target
    prompts = _prompts(16, prompt_tokens)
    expected = _generate_all(target, prompts, max_tokens=max_tokens)
    assert _wait_all_free(chaos_stack) == NUM_BLOCKS
    process = _record(chaos_stack, victim)
    restarts = _status(chaos_stack)[victim]["restarts"]
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(after_s)
        os.kill(process.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    got = _generate_all(target, prompts, during=kill, max_tokens=max_tokens)
    print(f"16 requests done {time.monotonic() - killed_at[0]:.1f} s after {victim} was killed", file=sys.stderr)
    assert got == expected                                  # one stream each: no token missing or twice
    assert _wait_restarted(chaos_stack, victim, restarts + 1) >= 0
    assert _wait_all_free(chaos_stack) == NUM_BLOCKS        # nothing leaked
