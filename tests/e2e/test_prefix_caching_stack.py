"""Prefix caching through the real stacks (split: prefill and decode share the cached blocks in the
arena's pool; colocated): a repeated conversation's second prefill computes only its tail, with the
same greedy tokens; cached tokens in the gRPC and OpenAI usage; the prefix-cache metrics; every
block back (cached ones count as free) once nothing runs; the orchestrator keys a waiting prompt as
prefill does, and `duoctl status` shows the hit rate and the cached blocks."""
from __future__ import annotations

import time
import urllib.request

import openai
import pytest

import duoserve
from duoserve.duoctl import AdminClient, format_status
from duoserve.v1 import admin_pb2 as pb
from orchestrator.prefix_view import CacheScope
from orchestrator.redis_state import RedisState
from services.common import stream_entries
from services.common.contracts import QueuedRequest
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
