"""bench.multiturn against a canned OpenAI server (no model): a turn is sent only after the previous
answer arrived and the think time passed, it resends the history with the answer's token ids (or,
from a server that sends only text, the text tokenized by the server), a failed turn ends its
conversation, the cached tokens of the usage are counted; and the systems and configurations
without prefix caching."""
from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from bench.compare import setups_for
from bench.conversations import Conversation, conversations_with_token_ids
from bench.datasets import Arrival
from bench.peer import num_requests, systems_for

web = pytest.importorskip("aiohttp.web")

GAP_S = 0.01                # the canned server: between tokens
THINK_S = 0.2
ANSWER_BASE = 50_000        # the canned answer's ids: 50000 + position + 100 * request number
FAIL = 13                   # a prompt whose last id is this fails with HTTP 500


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class Canned:
    """The server's side: every request with its arrival time, the time its last token went out, and a
    prefix cache that reports the longest common prefix with any earlier prompt as cached."""

    def __init__(self, token_ids: bool) -> None:
        self.token_ids = token_ids          # honour return_token_ids (vLLM) or send text only
        self.requests: list[dict] = []      # body, arrived, done (perf_counter)
        self.tokenized: list[str] = []

    def _cached(self, prompt: list[int], entry: dict) -> int:
        best = 0
        for r in self.requests:
            if r is entry:
                continue
            other = r["body"]["prompt"]
            n = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
            best = max(best, n)
        return best

    async def completions(self, request):
        body = await request.json()
        entry = {"body": body, "arrived": time.perf_counter()}
        self.requests.append(entry)
        prompt, n, k = body["prompt"], body["max_tokens"], len(self.requests)
        if prompt[-1] == FAIL:
            return web.json_response({"error": {"message": "canned failure"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(n):
            await asyncio.sleep(GAP_S)
            choice = {"index": 0, "text": f" w{i}", "finish_reason": "length" if i == n - 1 else None}
            if self.token_ids and body.get("return_token_ids"):
                choice["token_ids"] = [ANSWER_BASE + i + 100 * k]
            await response.write(_event({"choices": [choice], "usage": None}))
        entry["done"] = time.perf_counter()
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n,
                 "prompt_tokens_details": {"cached_tokens": self._cached(prompt, entry)}}
        await response.write(_event({"choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def tokenize(self, request):
        text = (await request.json())["prompt"]
        self.tokenized.append(text)
        return web.json_response({"tokens": [ord(c) for c in text[:400]]})


def _run(convs: list[Conversation], *, token_ids: bool = True, run: int = 1, max_concurrency: int | None = None):
    from aiohttp.test_utils import TestServer

    from bench.serve import benchmark

    async def go():
        canned, app = Canned(token_ids), web.Application()
        app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "c", "max_model_len": 4096}]}))
        app.router.add_post("/v1/completions", canned.completions)
        app.router.add_post("/tokenize", canned.tokenize)
        async with TestServer(app, host="127.0.0.1") as server:
            result = await benchmark(f"http://127.0.0.1:{server.port}", convs, Arrival("poisson", math.inf,
                                     per="conversation"), warmup=0, progress=False, slo_ttft_ms=10_000,
                                     slo_tpot_ms=10_000, run=run, max_concurrency=max_concurrency)
        return result, canned
    return asyncio.run(go())


def _convs(n: int, turns: int, *, system: int = 8, user: int = 5, answer: int = 3) -> list[Conversation]:
    return conversations_with_token_ids([Conversation(system, (user,) * turns, (answer,) * turns, THINK_S)
                                         for _ in range(n)], list(range(1, 200)))


def test_each_turn_waits_for_the_answer_and_resends_the_history_with_it():
    convs = _convs(2, 3)
    result, canned = _run(convs)
    assert result.metrics.completed == 6 and result.metrics.slo_attainment == 1.0
    assert {(r.conversation, r.turn) for r in result.records} == {(c, t) for c in range(2) for t in range(3)}
    for c, conv in enumerate(convs):
        mine = [r for r in canned.requests if r["body"]["prompt"][8:13] == list(conv.user_ids[0])]
        assert len(mine) == 3
        for turn, (before, after) in enumerate(zip(mine, mine[1:]), start=1):
            answer = [ANSWER_BASE + i + 100 * (canned.requests.index(before) + 1) for i in range(3)]
            assert after["body"]["prompt"] == before["body"]["prompt"] + answer + list(conv.user_ids[turn])
            assert after["arrived"] - before["done"] >= THINK_S * 0.9          # after the answer, and thinking
        assert all(r["body"]["return_token_ids"] is True for r in mine)
    first_tokens = {r["body"]["prompt"][0] for r in canned.requests}
    assert first_tokens == {1001}                                             # run 1's: shared within the run
    later = [r for r in result.records if r.turn]
    assert all(r.cached_tokens == r.prompt_len - 3 - 5 for r in later)        # the last prompt (not its answer)
    assert result.metrics.total_cached_tokens == sum(r.cached_tokens for r in result.records)
    assert all(r.scheduled_s > 0 for r in later) and result.arrival["per"] == "conversation"


def test_a_text_only_server_gets_the_answer_back_as_its_own_tokens():
    result, canned = _run(_convs(1, 2), token_ids=False)
    assert result.metrics.completed == 2
    assert canned.tokenized == [" w0 w1 w2"]                                  # the answer's text, once
    second = canned.requests[1]["body"]["prompt"]
    assert second[13:13 + 9] == [ord(c) for c in " w0 w1 w2"]


def test_a_failed_turn_ends_its_conversation_and_counts_every_later_turn_failed():
    convs = _convs(2, 3)
    broken = convs[0].user_ids[1][:-1] + (FAIL,)
    convs[0] = Conversation(8, (5,) * 3, (3,) * 3, THINK_S, convs[0].system_ids,
                            (convs[0].user_ids[0], broken, convs[0].user_ids[2]))
    result, canned = _run(convs)
    mine = sorted((r for r in result.records if r.conversation == 0), key=lambda r: r.turn)
    assert [r.success for r in mine] == [True, False, False]
    assert "HTTP 500" in mine[1].error and "not sent: turn 1 of conversation 0 failed" in mine[2].error
    assert result.metrics.completed == 4 and result.metrics.failed == 2
    assert len(canned.requests) == 5                                          # the third turn never went out
    assert result.metrics.slo_attainment == pytest.approx(4 / 6)


def test_max_concurrency_counts_conversations_in_progress():
    result, canned = _run(_convs(3, 2), max_concurrency=1)
    assert result.metrics.completed == 6
    starts = sorted(r["arrived"] for r in canned.requests)
    convs_in_order = [r["body"]["prompt"][8:13] for r in sorted(canned.requests, key=lambda r: r["arrived"])]
    assert convs_in_order[0] == convs_in_order[1] and convs_in_order[2] == convs_in_order[3]   # one at a time
    assert starts == sorted(starts)


def test_systems_and_configs_without_prefix_caching():
    vllm, split, colocated = systems_for(["vllm-no-cache", "split-no-cache", "colocated"], 512)
    assert vllm.is_vllm and not vllm.prefix_caching and vllm.name == "vllm-no-cache"
    assert split.setup.name == "split-no-cache" and not split.setup.prefix_caching and split.setup.policy == "auto"
    assert colocated.prefix_caching and colocated.setup.prefix_caching
    with pytest.raises(ValueError, match="no-cache"):
        systems_for(["sglang"], 512)
    setups = setups_for(["colocated-no-cache", "split-dynamic-no-cache", "split-static"], [256])
    assert [(s.name, s.prefix_caching) for s in setups] == [
        ("colocated-c256-no-cache", False), ("split-dynamic-no-cache", False), ("split-static", True)]
    assert num_requests(_convs(3, 4)) == 12
