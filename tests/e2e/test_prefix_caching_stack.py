"""Prefix caching through the real stacks (split: prefill and decode share the cached blocks in the
arena's pool; colocated): a repeated conversation's second prefill computes only its tail, with the
same greedy tokens; cached tokens in the gRPC and OpenAI usage; the prefix-cache metrics; `n > 1`
computes its prompt once; one of several requests sharing blocks cancelled; every block back
(cached ones count as free) once nothing runs; the orchestrator keys a waiting prompt as prefill
does, and `duoctl status` shows the hit rate and the cached blocks."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import urllib.request
import uuid

import openai
import pytest

import duoserve
from duoserve.duoctl import AdminClient, format_status
from duoserve.v1 import admin_pb2 as pb
from orchestrator.prefix_view import CacheScope
from orchestrator.redis_state import RedisState
from services.common import stream_entries
from services.common.contracts import QueuedRequest
from services.common.redis_blocks import RedisBlockAllocator
from services.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

SYSTEM = ("You are a helpful assistant who answers questions about geography in one short sentence. "
          "Always name the country and the continent, and never add anything else. ") * 4


def _messages(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Which country is city number {i} in?"},
                     {"role": "assistant", "content": f"City {i} is in country {i}, in Europe."}]
    return messages + [{"role": "user", "content": "And the capital of France?"}]


def test_a_repeated_conversation_prefills_only_its_tail(any_stack):
    with duoserve.Client(any_stack.target, timeout=300) as client:
        first = client.generate(messages=_messages(3), max_tokens=16, temperature=0)
        second = client.generate(messages=_messages(3), max_tokens=16, temperature=0)
        longer = client.generate(messages=_messages(4), max_tokens=16, temperature=0)
    assert second.token_ids == first.token_ids
    prompt = first.usage.prompt_tokens
    assert first.usage.cached_tokens < prompt - 16
    assert prompt - 16 <= second.usage.cached_tokens < prompt           # all but the last block's tokens
    assert longer.usage.cached_tokens >= first.usage.cached_tokens // 16 * 16 - 16
    assert any_stack.wait_free_blocks(512) == 512                       # cached blocks are free to take


def test_cached_tokens_in_the_openai_usage_and_the_metrics(split_stack):
    with openai.OpenAI(base_url=f"{split_stack.state.http_url}/v1", api_key="unused", timeout=300,
                       max_retries=0) as client:
        model = client.models.list().data[0].id
        replies = [client.chat.completions.create(model=model, messages=_messages(5), max_tokens=8, temperature=0)
                   for _ in range(2)]
    details = [r.usage.prompt_tokens_details for r in replies]
    assert details[1].cached_tokens >= replies[1].usage.prompt_tokens - 16
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    with urllib.request.urlopen(f"{split_stack.state.http_url}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    hits = [line for line in metrics.splitlines() if line.startswith("duoserve:prefix_cache_hits_total")]
    assert hits and max(float(line.rsplit(" ", 1)[1]) for line in hits) > 0


def _prefill_counter(http_url: str, name: str) -> float:
    """A counter of prefill's, from the stack's /metrics (the gateway gathers every process's)."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(name + "{") and 'phase="prefill"' in line)


def test_n_copies_compute_their_prompt_once(split_stack):
    """n = 3: the gateway queues three requests; with prefill paused until all three are queued (so
    it admits them in one iteration), the two after the first wait for its prompt's blocks and reuse
    them (prefill's counters: about one prompt computed, two prompts' worth of hits)."""
    url, names = split_stack.state.http_url, ("duoserve:prompt_tokens_total", "duoserve:prefix_cache_hits_total")
    prompt = f"Copies {uuid.uuid4().hex}: " + SYSTEM                     # cached by nothing before
    before = [_prefill_counter(url, n) for n in names]
    queued = split_stack.redis.xlen(split_stack.keys.prefill_queue)
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=300, max_retries=0) as client, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        model = client.models.list().data[0].id
        prefill = split_stack.process("prefill").pid
        os.kill(prefill, signal.SIGSTOP)
        try:
            future = pool.submit(client.completions.create, model=model, prompt=prompt, max_tokens=6,
                                 temperature=0, n=3)
            deadline = time.monotonic() + 60
            while split_stack.redis.xlen(split_stack.keys.prefill_queue) < queued + 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os.kill(prefill, signal.SIGCONT)
        reply = future.result()
    tokens = reply.usage.prompt_tokens
    computed, hits = (_prefill_counter(url, n) - b for n, b in zip(names, before))
    assert len({c.text for c in reply.choices}) == 1                  # greedy: the same text three times
    assert hits >= 2 * (tokens - 16) and computed <= tokens + 2 * 16, (tokens, computed, hits)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0       # the prompt, counted once, was computed
    assert split_stack.wait_free_blocks(512) == 512


def test_cancelling_one_of_requests_that_share_blocks(split_stack):
    """Four greedy streams on one prefix; one cancelled mid-decode while they share its blocks: the
    other three end with the tokens of a cold run, every block comes back, the prefix stays cached."""
    blocks = RedisBlockAllocator(split_stack.redis, split_stack.keys)
    prefix = f"Shared {uuid.uuid4().hex}: " + SYSTEM
    prompts = [prefix + f"Question {i}: which country is city {i} in?" for i in range(4)]
    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True)
    with duoserve.Client(split_stack.target, timeout=300) as client:
        reference = []
        for p in prompts[1:]:
            blocks.reset_cache()                                      # the reference computes cold
            reference.append(client.generate(prompt=p, **greedy).token_ids)
        blocks.reset_cache()
        streams = [client.stream(prompt=p, **greedy) for p in prompts]
        received = 0
        for chunk in streams[0]:
            received += len(chunk.token_ids)
            if received >= 4:
                break
        holders = max(int(v) for v in split_stack.redis.hvals(split_stack.keys.kv_cache_refs))
        streams[0].close()                                            # cancelled in decode
        survivors = [[c for c in s] for s in streams[1:]]
        assert split_stack.wait_free_blocks(512) == 512
        pool = blocks.audit()
        again = client.generate(prompt=prefix + "Question 9: and city 9?", max_tokens=1, temperature=0)
    assert holders >= 2                                               # cancelled while others held its prefix
    assert [tuple(t for c in chunks for t in c.token_ids) for chunks in survivors] == reference
    assert all(chunks[-1].finish_reason == "length" for chunks in survivors)
    assert pool.is_consistent and pool.owners == 0
    assert again.usage.cached_tokens >= (again.usage.prompt_tokens - 32) // 16 * 16   # the prefix still cached


def test_the_orchestrator_sees_what_prefill_cached_and_duoctl_status_shows_it(split_stack):
    prompt = [2000 + 7 * i for i in range(90)]                           # 5 full blocks and 10 tokens
    with duoserve.Client(split_stack.target, timeout=300) as client:
        client.generate(token_ids=prompt, max_tokens=4, temperature=0)
        again = client.generate(token_ids=prompt, max_tokens=4, temperature=0)
    assert again.usage.cached_tokens == 80
    keys = split_stack.keys
    report = stream_entries.read_report(split_stack.redis.hget(keys.worker_stats("prefill"), stream_entries.FIELD))
    assert report.prefix_caching and report.cache_salt and report.prefix_hit_tokens >= 80
    # The prompt as it would wait in the queue: the orchestrator's keys (the salt prefill reports) find its blocks.
    entry = stream_entries.queued(keys, QueuedRequest("probe", tuple(prompt), SamplingParams(max_tokens=4),
                                                      keys.reply("none"), time.time()))
    state = RedisState(split_stack.redis, keys)
    assert state.cached_tokens([("1-0", entry.fields)], CacheScope(16, report.cache_salt)) == {"1-0": 80}
    assert state.cached_tokens([("1-0", entry.fields)], CacheScope(16, "another memory")) == {"1-0": 0}
    admin = AdminClient(split_stack.process("orchestrator").target, split_stack.secret)
    deadline = time.monotonic() + 30
    while True:                                                          # its snapshot is a tick old
        status = admin.call("GetStatus", pb.GetStatusRequest())
        prefill = next((w for w in status.workers if w.phase == "prefill"), None)
        if prefill is not None and prefill.prefix_hit_tokens >= report.prefix_hit_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert prefill.prefix_caching and prefill.prefix_query_tokens >= prefill.prefix_hit_tokens >= 80
    assert status.kv_blocks_cached >= 5 and status.kv_blocks_evictable <= status.kv_blocks_cached
    text = format_status(status)
    assert f"prefix cache: {status.kv_blocks_cached} blocks cached" in text and "hit rate" in text, text
