"""What every chaos test does to a detached, supervised stack: read its state, kill, wait, count blocks.

Shared by tests/chaos/*: one copy of the stack's bookkeeping so each test says only what it kills and
what it expects.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import sys
import time
from typing import Callable

import redis

import duoserve
from duoserve import stack
from duoserve.stack import StackConfig
from services.common.contracts import KeySpace
from services.common.redis_blocks import PoolAudit, RedisBlockAllocator, free_count


def state(config: StackConfig) -> stack.StackState:
    return stack.read_state(config.state_path)


def record(config: StackConfig, name: str) -> stack.ProcessRecord:
    return next(r for r in state(config).processes if r.name == name)


def status(config: StackConfig) -> dict[str, dict]:
    """`duoserve status --json` by process name: pid, health, restarts."""
    out = io.StringIO()
    stack.status(config.state_dir, config.name, as_json=True, out=out)
    return {p["name"]: p for p in json.loads(out.getvalue())["processes"]}


def wait_restarted(config: StackConfig, name: str, restarts: int, timeout: float = 240.0) -> float:
    """Seconds until `name` has been restarted `restarts` times and every process is SERVING."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        procs = status(config)
        if procs[name]["restarts"] >= restarts and all(p["health"] == "SERVING" for p in procs.values()):
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{name} not restarted and SERVING after {timeout} s: {status(config)}")


def prompts(n: int, length: int, offset: int = 0) -> list[list[int]]:
    """n distinct token-id prompts of `length` tokens (no tokenizer needed)."""
    return [[100 + (7 * (i + offset) + k) % 2000 for k in range(length)] for i in range(n)]


def shared_prompts(n: int, shared: int, tail: int) -> list[list[int]]:
    """n prompts that start with the same `shared` tokens (whole blocks of it shared in the KV pool),
    each then `tail` tokens of its own."""
    prefix = [300 + (11 * k) % 1500 for k in range(shared)]
    return [prefix + [120 + (13 * i + 5 * k) % 1700 for k in range(tail)] for i in range(n)]


def generate_all(target: str, prompt_list: list[list[int]], max_tokens: int,
                 during: Callable[[], None] | None = None) -> list[tuple[int, ...]]:
    """Greedy requests through the SDK, all in flight at once; `during()` runs once they are submitted."""
    def one(prompt: list[int]) -> tuple[int, ...]:
        with duoserve.Client(target, timeout=300) as client:
            return client.generate(token_ids=prompt, max_tokens=max_tokens, temperature=0,
                                   ignore_eos=True).token_ids

    with concurrent.futures.ThreadPoolExecutor(len(prompt_list)) as pool:
        futures = [pool.submit(one, p) for p in prompt_list]
        if during is not None:
            during()
        return [f.result() for f in futures]


def free_blocks(config: StackConfig) -> int:
    """Blocks on the stack's free list (the pool's size once nothing runs and nothing leaked)."""
    st = state(config)
    client = redis.Redis.from_url(st.redis_url)
    try:
        return free_count(client, KeySpace(st.key_prefix))
    finally:
        client.close()


def reset_prefix_cache(config: StackConfig) -> int:
    """Forget the stack's cached prefixes (RedisBlockAllocator.reset_cache): the run with the kill then
    computes its prompts as the reference run did, cold, so the kill finds the work where the test
    means it to be (a cached prefill would be over before it)."""
    st = state(config)
    client = redis.Redis.from_url(st.redis_url)
    try:
        return RedisBlockAllocator(client, KeySpace(st.key_prefix)).reset_cache()
    finally:
        client.close()


def _allocator(config: StackConfig) -> tuple[redis.Redis, RedisBlockAllocator]:
    st = state(config)
    client = redis.Redis.from_url(st.redis_url)
    return client, RedisBlockAllocator(client, KeySpace(st.key_prefix))


def audit(config: StackConfig) -> PoolAudit:
    """The pool's audit (RedisBlockAllocator.audit): every block free, cached or held, counted."""
    client, blocks = _allocator(config)
    try:
        return blocks.audit()
    finally:
        client.close()


def most_holders(config: StackConfig) -> int:
    """The most requests holding one cached block now (its reference count): 2 and more while
    requests share prefix blocks."""
    st = state(config)
    client = redis.Redis.from_url(st.redis_url)
    try:
        return max((int(v) for v in client.hvals(KeySpace(st.key_prefix).kv_cache_refs)), default=0)
    finally:
        client.close()


def wait_all_free(config: StackConfig, num_blocks: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while (free := free_blocks(config)) != num_blocks and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


def in_decode(config: StackConfig) -> int:
    """Hand-offs decode holds now: entries of the admit stream pending with its group (each one a
    request decode is running; none before decode's group exists)."""
    st = state(config)
    client = redis.Redis.from_url(st.redis_url)
    try:
        return int(client.xpending(KeySpace(st.key_prefix).decode_admit, "decode")["pending"])
    except redis.ResponseError:            # NOGROUP: decode has not started yet
        return 0
    finally:
        client.close()


def wait_in_decode(config: StackConfig, at_least: int, timeout: float = 120.0) -> int:
    """Wait until decode holds `at_least` requests (a kill timed by the stack's state, not by a sleep,
    which a loaded machine outruns); -> how many it holds."""
    deadline = time.monotonic() + timeout
    while (held := in_decode(config)) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"decode holds {held} requests after {timeout} s, not {at_least}")
        time.sleep(0.05)
    return held


def say(message: str) -> None:
    print(message, file=sys.stderr)
