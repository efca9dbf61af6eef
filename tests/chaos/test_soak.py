"""`make chaos`: one process after another killed with `kill -9`, again and again, under a steady load
(every process of a split stack by default: prefill, decode, gateway, arena, redis, orchestrator).

Skipped unless `--soak-minutes N` is given (the Makefile's `chaos` target gives it). Four clients send
greedy requests from a fixed set without pause while, every `--soak-interval` seconds, the next process
of `--soak-victims` is killed; the supervisor restarts it. At the end every request must have completed
with the tokens of the same prompt on the undisturbed stack, and every KV block be back on the free
list. Prints one line per kill (time to SERVING again) and the totals.
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field

import pytest

import duoserve
from duoserve import stack
from duoserve.stack import Mode, StackConfig
from tests.chaos import chaos_ops as ops

pytestmark = pytest.mark.slow

NUM_BLOCKS = 512
NUM_CLIENTS = 4
PROMPT_TOKENS = 96
MAX_TOKENS = 24


@dataclass
class LoadTally:
    """What the clients saw; appended to by their threads (list.append is atomic)."""

    done: list[float] = field(default_factory=list)          # seconds each correct request took
    wrong: list[str] = field(default_factory=list)           # requests whose tokens differ
    failed: list[str] = field(default_factory=list)          # requests that raised


@pytest.fixture(scope="module")
def soak_options(request) -> tuple[float, float, tuple[str, ...]]:
    minutes = request.config.getoption("--soak-minutes")
    if not minutes:
        pytest.skip("a soak test: `make chaos` (or --soak-minutes N) runs it")
    victims = tuple(v for v in request.config.getoption("--soak-victims").split(",") if v)
    return minutes, request.config.getoption("--soak-interval"), victims


@pytest.fixture(scope="module")
def soak_stack(soak_options, tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("soak"), cache_dir=default_model_dir.parent,
                         name="soak", mode=Mode.SPLIT, num_kv_blocks=NUM_BLOCKS, startup_timeout_s=300)
    stack.up(config, detach=True, say=ops.say)
    yield config
    stack.down(config.state_dir, config.name, stop_timeout_s=10, say=lambda m: None)


def _client_loop(target: str, cases: list[tuple[list[int], tuple[int, ...]]], offset: int,
                 stop: threading.Event, tally: LoadTally) -> None:
    with duoserve.Client(target, timeout=300) as client:
        k = offset
        while not stop.is_set():
            prompt, expected = cases[k % len(cases)]
            k += 1
            started = time.monotonic()
            try:
                got = client.generate(token_ids=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      ignore_eos=True).token_ids
            except Exception as e:       # noqa: BLE001 - every failure is counted, none stops the load
                tally.failed.append(f"{type(e).__name__}: {e}")
                continue
            if got == expected:
                tally.done.append(time.monotonic() - started)
            else:
                tally.wrong.append(f"prompt {k % len(cases)}: {got} != {expected}")


def _kill_and_wait(config: StackConfig, victim: str) -> float:
    restarts = ops.status(config)[victim]["restarts"]
    os.kill(ops.record(config, victim).pid, signal.SIGKILL)
    return ops.wait_restarted(config, victim, restarts + 1)


def test_repeated_kills_under_steady_load_lose_nothing(soak_stack, soak_options):
    minutes, interval_s, victims = soak_options
    target = ops.state(soak_stack).gateway_target
    prompt_list = ops.prompts(8, PROMPT_TOKENS)
    cases = list(zip(prompt_list, ops.generate_all(target, prompt_list, MAX_TOKENS)))
    tally, stop = LoadTally(), threading.Event()
    clients = [threading.Thread(target=_client_loop, args=(target, cases, i * 2, stop, tally))
               for i in range(NUM_CLIENTS)]
    for thread in clients:
        thread.start()
    recoveries: list[tuple[str, float]] = []
    end = time.monotonic() + minutes * 60
    try:
        while time.monotonic() + interval_s < end:
            time.sleep(interval_s)
            victim = victims[len(recoveries) % len(victims)]
            recoveries.append((victim, _kill_and_wait(soak_stack, victim)))
            ops.say(f"kill {len(recoveries)}: {victim} SERVING again after {recoveries[-1][1]:.1f} s; "
                    f"{len(tally.done)} requests done, {len(tally.wrong)} wrong, {len(tally.failed)} failed")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=600)
    free = ops.wait_all_free(soak_stack, NUM_BLOCKS, timeout=60)
    latency = statistics.median(tally.done) if tally.done else float("nan")
    ops.say(f"soak: {minutes} min, {len(recoveries)} kills, {len(tally.done)} requests done "
            f"(median {latency:.1f} s), {len(tally.wrong)} wrong, {len(tally.failed)} failed, "
            f"{NUM_BLOCKS - free} blocks leaked")
    for victim in sorted(set(victims)):
        times = [t for v, t in recoveries if v == victim]
        if times:
            ops.say(f"  {victim}: {len(times)} kills, back in {min(times):.1f}-{max(times):.1f} s")
    assert not tally.failed, tally.failed[:5]
    assert not tally.wrong, tally.wrong[:5]
    assert free == NUM_BLOCKS
    assert recoveries, "the soak ended before its first kill: give more minutes or a shorter interval"
