"""Two pairs behind one gateway, as real processes (`duoserve up --pairs 2`, one core each): a burst
is served by both; requests sharing a long prefix land on the pair that holds it; metrics and
`duoctl status` per pair; and, last, a pair killed with requests in flight (kill -9 of its prefill
and decode; the stack runs with `--restart never`, so the pair stays dead and only the gateway's
failover can finish them) has them finished on the other with the same greedy tokens."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import duoserve
from duoserve import stack
from duoserve.stack import Mode, StackConfig
from services.common.contracts import KeySpace
from services.common.redis_blocks import free_count
from tests.e2e.conftest import RunningStack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.long]   # a two-pair stack of its own (~1 minute): `make chaos` runs it, `make test` does not

NUM_BLOCKS = 256
SHARED = "You are a meticulous travel agent. Plan trips carefully, list trains, hotels and museums. " * 12


@pytest.fixture(scope="module")
def pairs_stack(tmp_path_factory, default_model_dir):
    config = StackConfig(state_dir=tmp_path_factory.mktemp("stack-pairs"), cache_dir=default_model_dir.parent,
                         name="e2e-pairs", mode=Mode.SPLIT, pairs=2, num_kv_blocks=NUM_BLOCKS, max_queue_len=64,
                         startup_timeout_s=300, restart="never")
    stack.up(config, detach=True, say=lambda m: print(m, file=sys.stderr))
    running = RunningStack(config, stack.read_state(config.state_path))
    yield running
    stop_stack(running)


def _metric(running: RunningStack, name: str) -> dict[str, float]:
    """pair -> value of a gateway series labelled by pair."""
    text = urllib.request.urlopen(f"{running.state.http_url}/metrics", timeout=30).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(rf'{name}\{{.*pair="([^"]+)".*\}} ([0-9.e+]+)$', line)
        if match and ('process="gateway"' in line or 'process="' not in line):
            found[match[1]] = float(match[2])
    return found


def _all_free(running: RunningStack) -> list[int]:
    deadline = time.monotonic() + 60
    while True:
        free = [free_count(running.redis, KeySpace(running.state.pair_key_prefix(i))) for i in range(2)]
        if free == [NUM_BLOCKS] * 2 or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


def _generate(target: str, prompt: str, max_tokens: int = 8):
    with duoserve.Client(target, timeout=300) as client:
        return client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)


def test_a_burst_is_served_by_both_pairs(pairs_stack):
    before = _metric(pairs_stack, "duoserve:pair_requests_routed_total")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: _generate(pairs_stack.target, f"Count to {i}."), range(8)))
    assert all(r.usage.completion_tokens == 8 for r in results)
    after = _metric(pairs_stack, "duoserve:pair_requests_routed_total")
    gained = {p: after[p] - before.get(p, 0) for p in after}
    assert len(gained) == 2 and all(n >= 2 for n in gained.values()), gained
    assert _all_free(pairs_stack) == [NUM_BLOCKS] * 2


def test_requests_sharing_a_long_prefix_land_on_the_pair_that_holds_it(pairs_stack):
    first = _generate(pairs_stack.target, SHARED + "First question?")
    before = _metric(pairs_stack, "duoserve:pair_requests_routed_total")
    later = [_generate(pairs_stack.target, SHARED + f"Question {i}?") for i in range(3)]
    after = _metric(pairs_stack, "duoserve:pair_requests_routed_total")
    gained = {p: after[p] - before.get(p, 0) for p in after if after[p] - before.get(p, 0)}
    assert len(gained) == 1, gained                                     # all three on one pair ...
    assert all(r.usage.cached_tokens >= first.usage.prompt_tokens - 32 for r in later)   # ... the one with the prefix


def test_duoctl_status_shows_each_pair(pairs_stack):
    out = subprocess.run([sys.executable, "-m", "duoserve.duoctl", "--name", "e2e-pairs", "--state-dir",
                          str(pairs_stack.config.state_dir), "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pair 0:" in out.stdout and "pair 1:" in out.stdout and out.stdout.count("worker ") == 2


def test_zz_a_killed_pairs_requests_finish_on_the_other_with_the_same_tokens(pairs_stack):
    """Last in the module: pair 0 stays dead after it."""
    prompts = [f"Write a long story about a dragon number {i}." for i in range(4)]
    reference = [_generate(pairs_stack.target, p, 40).token_ids for p in prompts]
    before = _metric(pairs_stack, "duoserve:pair_requests_routed_total")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_generate, pairs_stack.target, p, 40) for p in prompts]
        time.sleep(1.5)                                                 # every request running somewhere
        routed = _metric(pairs_stack, "duoserve:pair_requests_routed_total")
        for name in ("prefill-p0", "decode-p0"):
            os.kill(pairs_stack.process(name).pid, signal.SIGKILL)
        results = [f.result(timeout=240) for f in futures]
    p0 = pairs_stack.state.pair_key_prefix(0)
    on_p0 = routed.get(p0, 0) - before.get(p0, 0)
    assert on_p0 >= 1, routed                                          # the kill hit some of them
    assert [r.token_ids for r in results] == reference                 # each token once, none lost
    assert _metric(pairs_stack, "duoserve:pair_requests_resent_total").get(p0, 0) >= 1
    assert _metric(pairs_stack, "duoserve:pair_alive") == {p0: 0.0, pairs_stack.state.pair_key_prefix(1): 1.0}
    p1 = KeySpace(pairs_stack.state.pair_key_prefix(1))
    deadline = time.monotonic() + 60
    while free_count(pairs_stack.redis, p1) != NUM_BLOCKS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert free_count(pairs_stack.redis, p1) == NUM_BLOCKS             # the live pair has every block back
