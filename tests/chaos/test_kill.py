"""Real processes killed under load (issue 13): the supervisor restarts them and nothing is lost.

One split stack, detached, supervised as `duoserve up --detach` leaves it. Each test: requests in
flight, `kill -9` of one process, nothing else touched; then every request completes with the tokens
of a run without the kill, every KV block is back, and the restart shows in `duoserve status`. The
last ones kill a worker while its requests share prefix blocks (prefix caching, issue 15).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

import duoserve
from duoserve import stack
from duoserve.stack import Mode, StackConfig
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512
PROMPT_TOKENS = 300          # long enough that prefill holds several prompts when it is killed
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("chaos"), cache_dir=default_model_dir.parent,
                         name="chaos", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300)
    stack.up(config, detach=True, say=ops.say)
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    state = stack.read_state(config.state_path)
    assert state is None


def test_a_killed_orchestrator_is_restarted(chaos_stack):
    old = ops.record(chaos_stack, "orchestrator")
    os.kill(old.pid, signal.SIGKILL)
    recovery_s = ops.wait_restarted(chaos_stack, "orchestrator", 1)
    print(f"orchestrator back in {recovery_s:.1f} s", file=sys.stderr)
    assert ops.record(chaos_stack, "orchestrator").pid != old.pid
    with duoserve.Client(ops.state(chaos_stack).gateway_target, timeout=120) as client:
        assert client.generate(prompt="The capital of France is", max_tokens=4, temperature=0).token_ids


@pytest.mark.parametrize("victim, prompt_tokens, max_tokens, after_s", [
    ("prefill", PROMPT_TOKENS, MAX_TOKENS, 1.5),   # a few prompts handed off, the rest queued in prefill
    ("decode", 32, 64, 3.0),                       # every request mid-generation in decode
])
def test_a_worker_killed_with_requests_in_flight_loses_nothing(chaos_stack, victim, prompt_tokens, max_tokens,
                                                                after_s):
    target = ops.state(chaos_stack).gateway_target
    prompts = ops.prompts(16, prompt_tokens)
    expected = ops.generate_all(target, prompts, max_tokens)
    assert ops.wait_all_free(chaos_stack, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(chaos_stack)                   # the kill run computes its prompts cold
    process = ops.record(chaos_stack, victim)
    restarts = ops.status(chaos_stack)[victim]["restarts"]
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(after_s)
        os.kill(process.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    got = ops.generate_all(target, prompts, max_tokens, during=kill)
    print(f"16 requests done {time.monotonic() - killed_at[0]:.1f} s after {victim} was killed", file=sys.stderr)
    assert got == expected                                  # one stream each: no token missing or twice
    assert ops.wait_restarted(chaos_stack, victim, restarts + 1) >= 0
    assert ops.wait_all_free(chaos_stack, NUM_BLOCKS) == NUM_BLOCKS   # nothing leaked


SHARED_TOKENS = 256          # 16 blocks every prompt of the shared-prefix tests starts with


@pytest.mark.parametrize("victim, tail_tokens, max_tokens", [
    ("prefill", 200, 12),    # the first handed off, holding the prefix; the others reusing it in prefill
    pytest.param("decode", 16, 48, marks=pytest.mark.chaos_long),   # all 8 in decode, each holding the
                                                                     # 16 prefix blocks (`make chaos`)
])
def test_a_worker_killed_while_requests_share_prefix_blocks_leaks_none(chaos_stack, victim, tail_tokens, max_tokens):
    target = ops.state(chaos_stack).gateway_target
    prompts = ops.shared_prompts(8, SHARED_TOKENS, tail_tokens)
    expected = ops.generate_all(target, prompts, max_tokens)
    assert ops.wait_all_free(chaos_stack, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(chaos_stack)                   # the prefix computed again, then shared
    process = ops.record(chaos_stack, victim)
    restarts = ops.status(chaos_stack)[victim]["restarts"]
    at_kill: list[tuple[int, int]] = []                   # (requests in decode, most holders of one block)

    def kill() -> None:
        ops.wait_in_decode(chaos_stack, 1 if victim == "prefill" else len(prompts))
        deadline = time.monotonic() + 60
        while ops.most_holders(chaos_stack) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        at_kill.append((ops.in_decode(chaos_stack), ops.most_holders(chaos_stack)))
        os.kill(process.pid, signal.SIGKILL)

    got = ops.generate_all(target, prompts, max_tokens, during=kill)
    print(f"{victim} killed with {at_kill[0][0]} requests in decode, a block held by {at_kill[0][1]}",
          file=sys.stderr)
    assert at_kill[0][1] >= 2                               # killed while requests shared blocks
    if victim == "prefill":
        assert at_kill[0][0] < len(prompts)                 # some still in prefill
    assert got == expected                                  # each request once, every token as without the kill
    assert ops.wait_restarted(chaos_stack, victim, restarts + 1) >= 0
    assert ops.wait_all_free(chaos_stack, NUM_BLOCKS) == NUM_BLOCKS
    pool = ops.audit(chaos_stack)                           # every block free or cached, nothing to repair
    assert pool.is_consistent and pool.owners == 0 and pool.free + pool.evictable == NUM_BLOCKS
    assert pool.cached >= SHARED_TOKENS // 16               # the shared prefix is still cached
