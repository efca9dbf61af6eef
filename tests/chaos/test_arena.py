"""The arena killed under load (issue 13): on the CPU a restarted arena re-opens the stack's segments,
so the workers keep their memory and every request in flight completes untouched; when it has to
make new memory (always on CUDA), the workers are killed and restarted on it, and every request in
flight is recomputed.

One split stack, detached, supervised as `duoserve up --detach` leaves it (test_kill.py's helpers).
16 greedy requests in flight, `kill -9` of the arena, nothing else touched: every request completes
with the tokens of a run without the kill, no block leaks, the workers are not restarted, /dev/shm
holds the same segments (the same memory, renamed to the new arena), and `duoserve down` leaves none.
Then the same with the arena's segments unlinked after the kill (the new-memory path, as on CUDA):
the workers restart, decode sends its hand-offs back to prefill, every stream is still unchanged.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from duoserve import stack
from duoserve.stack import Mode, StackConfig
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def arena_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("chaos-arena"), cache_dir=default_model_dir.parent,
                         name="chaos-arena", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300)
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    prefix = ops.state(config).segment_prefix
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)
    assert stack.read_state(config.state_path) is None
    assert not list(stack.SHM_DIR.glob(f"{prefix}*"))                  # `down` leaves no segment behind


def _segments(prefix: str) -> dict[str, tuple[int, int]]:
    """kind -> (owner pid, inode) of every segment of the stack."""
    found = {}
    for path in stack.SHM_DIR.glob(f"{prefix}*"):
        owner, kind = path.name[len(prefix):].split("-")
        found[kind] = (int(owner), path.stat().st_ino)
    return found


def test_a_killed_arena_reopens_its_segments_and_the_requests_in_flight_go_on(arena_stack):
    state = ops.state(arena_stack)
    prompts = ops.prompts(16, 128)
    expected = ops.generate_all(state.gateway_target, prompts, max_tokens=48)
    assert ops.wait_all_free(arena_stack, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(arena_stack)                   # the kill run computes its prompts cold
    before = _segments(state.segment_prefix)
    assert sorted(before) == ["kv", "record", "weights"]
    workers = {name: (ops.record(arena_stack, name).pid, ops.status(arena_stack)[name]["restarts"])
               for name in ("prefill", "decode")}
    arena = ops.record(arena_stack, "arena")
    restarts = ops.status(arena_stack)["arena"]["restarts"]
    at_kill: dict[str, float] = {}

    def kill() -> None:
        time.sleep(2.0)                        # some requests in prefill, some decoding
        at_kill["blocks_held"] = NUM_BLOCKS - ops.free_blocks(arena_stack)
        os.kill(arena.pid, signal.SIGKILL)
        at_kill["time"] = time.monotonic()
        at_kill["recovery_s"] = ops.wait_restarted(arena_stack, "arena", restarts + 1)

    got = ops.generate_all(state.gateway_target, prompts, during=kill, max_tokens=48)
    print(f"arena SERVING again {at_kill['recovery_s']:.1f} s after the kill -9 (requests held "
          f"{at_kill['blocks_held']:.0f} KV blocks then); all 16 done {time.monotonic() - at_kill['time']:.1f} s "
          "after it", file=sys.stderr)
    assert at_kill["blocks_held"] > 0                        # killed with requests in flight
    assert got == expected                                   # every token, as without the kill
    assert ops.record(arena_stack, "arena").pid != arena.pid
    assert {name: (ops.record(arena_stack, name).pid, ops.status(arena_stack)[name]["restarts"])
            for name in ("prefill", "decode")} == workers    # not restarted: they kept their memory
    after = _segments(state.segment_prefix)
    assert {kind: ino for kind, (_, ino) in after.items()} == {kind: ino for kind, (_, ino) in before.items()}
    assert {owner for owner, _ in after.values()} == {ops.record(arena_stack, "arena").pid}   # no new segment
    assert ops.wait_all_free(arena_stack, NUM_BLOCKS) == NUM_BLOCKS        # nothing leaked
    # A worker that attaches now gets the renamed segments: the memory decode still maps.
    prefill = ops.record(arena_stack, "prefill")
    os.kill(prefill.pid, signal.SIGKILL)
    ops.wait_restarted(arena_stack, "prefill", workers["prefill"][1] + 1)
    assert ops.generate_all(state.gateway_target, prompts[:4], max_tokens=48) == expected[:4]
    assert ops.wait_all_free(arena_stack, NUM_BLOCKS) == NUM_BLOCKS


def test_an_arena_restarted_on_new_memory_restarts_the_workers_and_recomputes_the_requests(arena_stack):
    """The path CUDA always takes (its IPC allocations die with the arena), forced on the CPU: the
    segments are unlinked right after the kill, so the restarted arena cannot re-open them."""
    state = ops.state(arena_stack)
    prompts = ops.prompts(16, 128, offset=16)
    expected = ops.generate_all(state.gateway_target, prompts, max_tokens=48)
    assert ops.wait_all_free(arena_stack, NUM_BLOCKS) == NUM_BLOCKS
    ops.reset_prefix_cache(arena_stack)                   # the kill run computes its prompts cold
    before = _segments(state.segment_prefix)
    restarts = {name: ops.status(arena_stack)[name]["restarts"] for name in ("arena", "prefill", "decode")}
    arena = ops.record(arena_stack, "arena")
    at_kill: dict[str, float] = {}

    def kill() -> None:
        ops.wait_in_decode(arena_stack, 4)     # some hand-offs in decode (the rest in prefill or queued)
        # The workers stop where they stand with the arena, as on CUDA, where nothing they compute
        # over a dead arena's memory counts: on the CPU they would otherwise finish every request on
        # the old segments (still mapped) before the new arena serves, and nothing would be recomputed.
        for name in ("prefill", "decode"):
            os.kill(ops.record(arena_stack, name).pid, signal.SIGSTOP)
        at_kill["blocks_held"] = NUM_BLOCKS - ops.free_blocks(arena_stack)
        os.kill(arena.pid, signal.SIGKILL)
        at_kill["time"] = time.monotonic()
        for path in stack.SHM_DIR.glob(f"{state.segment_prefix}*"):
            path.unlink()                      # nothing to re-open: the new arena makes new memory
        ops.wait_restarted(arena_stack, "arena", restarts["arena"] + 1)
        for name in ("decode", "prefill"):     # killed once the new arena serves, then restarted on it
            ops.wait_restarted(arena_stack, name, restarts[name] + 1)
        at_kill["recovery_s"] = time.monotonic() - at_kill["time"]

    got = ops.generate_all(state.gateway_target, prompts, during=kill, max_tokens=48)
    print(f"arena and workers SERVING on new memory {at_kill['recovery_s']:.1f} s after the kill -9 (requests "
          f"held {at_kill['blocks_held']:.0f} KV blocks then); all 16 done {time.monotonic() - at_kill['time']:.1f} s "
          "after it", file=sys.stderr)
    assert at_kill["blocks_held"] > 0                        # killed with requests in flight
    assert got == expected                                   # every token, recomputed, none twice or missing
    assert {name: ops.status(arena_stack)[name]["restarts"] for name in restarts} == \
        {name: n + 1 for name, n in restarts.items()}
    after = _segments(state.segment_prefix)                  # the new arena's set, nothing stale
    assert sorted(after) == ["kv", "record", "weights"]
    assert {owner for owner, _ in after.values()} == {ops.record(arena_stack, "arena").pid}
    assert after["kv"][1] != before["kv"][1]
    decode_log = open(ops.record(arena_stack, "decode").log, encoding="utf-8", errors="replace").read()
    assert "arena restarted with new memory" in decode_log   # hand-offs over the old memory recomputed
    assert ops.wait_all_free(arena_stack, NUM_BLOCKS) == NUM_BLOCKS        # nothing leaked
