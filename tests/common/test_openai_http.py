"""The OpenAI-compatible HTTP API over a fake frontend (no stack): request conversion, response and
SSE shapes, n choices, errors in OpenAI's body, a client gone mid-stream, /metrics merging, and the
gRPC interceptor keeping coroutine streaming handlers (Health/Watch) working."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from services.common.contracts import TokenLogprob
from services.common.model_info import ModelInfo
from services.engine.sampling_params import SamplingParams
from services.gateway.config import GatewayConfig, parse_args
from services.gateway.errors import ErrorInterceptor, InvalidInput, NotReady, QueueFull
from services.gateway.frontend import Chunk, GenerateInput, Usage
from services.gateway.openai_http import HttpState, build_app
from services.gateway.openai_protocol import error_of
from services.gateway.stack_metrics import merge

MODEL = "tiny-model"


class FakeTokenizer:
    """One token per character (id = code point)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 1)


@dataclass
class FakeFrontend:
    """Replies "abcdefgh"[:max_tokens], one character per chunk; records what it was asked."""

    reply: str = "abcdefgh"
    fail_with: Exception | None = None
    hold: asyncio.Event | None = None            # a stream waits on it after its first chunk
    config: GatewayConfig = field(default_factory=lambda: GatewayConfig("redis://x", "duo", 0, max_tokens_limit=4096))
    info: ModelInfo = field(default_factory=lambda: ModelInfo(MODEL, "/m", "Llama", 1000, 128, 16, 64, (2,),
                                                              "float32", "split"))
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    metrics: object = None
    seen: list[GenerateInput] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    redis_ok: bool = True                        # Frontend's: False while the stack's Redis does not answer

    async def tokenize(self, text: str, field: str = "text", add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens)

    async def prompt_ids(self, req: GenerateInput) -> list[int]:
        if req.token_ids is not None:
            return list(req.token_ids)
        if req.messages is not None:
            return self.tokenizer.encode("".join(f"<{r}>{c}" for r, c in req.messages))
        if not req.prompt:
            raise InvalidInput("prompt: empty; give a prompt, messages or token_ids")
        return await self.tokenize(req.prompt)

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt + params.max_tokens > self.info.max_model_len:
            raise InvalidInput(f"max_tokens: at most {self.info.max_model_len - num_prompt} more fit")

    async def generate(self, req: GenerateInput):
        self.seen.append(req)
        if self.fail_with:
            raise self.fail_with
        text = self.reply[:req.sampling.max_tokens]
        try:
            for i, ch in enumerate(text):
                last = i == len(text) - 1
                finish = ("length" if len(text) == req.sampling.max_tokens else "stop") if last else None
                usage = Usage(len(req.token_ids), i + 1, 0, 0, 0) if last else None
                k = req.sampling.logprobs
                logprobs = () if k is None else (TokenLogprob(ord(ch), -0.5, ((ord(ch), -0.5), (ord("z"), -1.5))[:k]),)
                yield Chunk(req.request_id, (ord(ch),), ch, finish, usage, logprobs)
                if self.hold is not None:
                    await self.hold.wait()
        finally:
            self.closed.append(req.request_id)


@pytest.fixture
def frontend():
    return FakeFrontend()


def client_of(frontend, serving: bool = True, peers=()) -> TestClient:
    return TestClient(build_app(HttpState(frontend, peers, serving=serving)), raise_server_exceptions=False)


def events(response) -> list:
    lines = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_completion_defaults_and_body(frontend):
    r = client_of(frontend).post("/v1/completions", json={"model": MODEL, "prompt": "hi", "unknown_field": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": "abcdefgh", "logprobs": None, "finish_reason": "stop",
                                "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    params = frontend.seen[0].sampling
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 1.0, 1.0, 0)


def test_chat_fills_the_context_and_maps_fields(frontend):
    r = client_of(frontend).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hey"}]}], "temperature": 0,
        "top_k": -1, "seed": 5, "n": 2, "stop": "x", "stop_token_ids": [7], "ignore_eos": True, "user": "u"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": "abcdefgh"}] * 2
    assert body["usage"]["prompt_tokens"] == 1 + len("<user>hey")            # once, not times n
    assert body["usage"]["completion_tokens"] == 16
    first, second = (req.sampling for req in frontend.seen)
    assert first.max_tokens == 128 - (1 + len("<user>hey"))                  # the rest of the context
    assert (first.seed, second.seed, first.top_k, first.stop, first.stop_token_ids) == (5, 6, 0, ("x",), (7,))
    assert first.ignore_eos and first.temperature == 0


def test_max_completion_tokens_wins_and_length_finish(frontend):
    r = client_of(frontend).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "max_tokens": 9, "max_completion_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "abc"


def test_prompt_forms(frontend):
    client = client_of(frontend)
    r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "echo": True})
    assert r.json()["choices"][0]["text"] == "\x05\x06\x07ab"
    r = client.post("/v1/completions", json={"prompt": [[5], [6, 7]], "max_tokens": 2, "n": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert r.json()["usage"]["prompt_tokens"] == 3
    assert [req.token_ids for req in frontend.seen[1:]] == [(5,), (5,), (6, 7), (6, 7)]
    r = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
    assert [c["text"] for c in r.json()["choices"]] == ["a", "a"]


def test_logprobs_in_both_shapes_and_penalties_passed_through(frontend):
    client = client_of(frontend)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                                                  "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5,
                                                  "frequency_penalty": -0.5, "repetition_penalty": 1.2,
                                                  "min_tokens": 1})
    assert r.json()["choices"][0]["logprobs"] == {"content": [
        {"token": t, "logprob": -0.5, "bytes": [ord(t)], "top_logprobs": [
            {"token": t, "logprob": -0.5, "bytes": [ord(t)]}, {"token": "z", "logprob": -1.5, "bytes": [122]}]}
        for t in "ab"]}
    params = frontend.seen[-1].sampling
    assert (params.logprobs, params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
            params.min_tokens) == (2, 0.5, -0.5, 1.2, 1)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 1,
                                                  "logprobs": True})
    assert r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert frontend.seen[-1].sampling.logprobs == 0
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1})
    assert r.json()["choices"][0]["logprobs"] == {"tokens": ["a", "b", "c"], "token_logprobs": [-0.5] * 3,
                                                  "top_logprobs": [{"a": -0.5}, {"b": -0.5}, {"c": -0.5}],
                                                  "text_offset": [0, 1, 2]}
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1, "stream": True})
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events(r)] == [[0], [1], [2]]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = client.post("/v1/completions", json={"prompt": "x", "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/completions", json={"prompt": "x", "presence_penalty": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"


def test_streaming_completion_with_usage(frontend):
    r = client_of(frontend).post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = events(r)
    assert "".join(e["choices"][0]["text"] for e in got[:-1]) == "abc"
    assert got[-2]["choices"][0]["finish_reason"] == "length"
    assert got[-1]["choices"] == [] and got[-1]["usage"]["completion_tokens"] == 3


def test_streaming_chat_starts_with_the_role(frontend):
    r = client_of(frontend).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "stream": True, "n": 2})
    got = events(r)
    assert [e["choices"][0]["delta"] for e in got[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert all(e["object"] == "chat.completion.chunk" for e in got)
    text = {0: "", 1: ""}
    for e in got[2:]:
        text[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
    assert text == {0: "ab", 1: "ab"}


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),
])
def test_bad_input_is_400_naming_the_field(frontend, body, param):
    r = client_of(frontend).post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("BadRequestError", 400, param), error
    assert not frontend.seen


def test_wrong_model_is_404_like_vllm(frontend):
    r = client_of(frontend).post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError",
                                  "param": "model", "code": 404}}


def test_full_queue_is_429_and_not_serving_is_503(frontend):
    frontend.fail_with = QueueFull("the prefill queue holds 64 requests")
    for stream in (False, True):
        r = client_of(frontend).post("/v1/completions", json={"prompt": "hi", "stream": stream})
        assert r.status_code == 429 and r.json()["error"]["type"] == "RateLimitError"
    r = client_of(frontend, serving=False).post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    assert client_of(frontend, serving=False).get("/health").status_code == 503
    assert client_of(frontend).get("/health").status_code == 200


def test_without_redis_every_route_that_needs_it_is_503_saying_so(frontend):
    frontend.redis_ok = False             # what the gateway's RedisWatch sets, with serving False
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = client_of(frontend, serving=False).post(route, json=body)
        assert r.status_code == 503 and "Redis is unreachable" in r.json()["error"]["message"]
    health = client_of(frontend, serving=False).get("/health")
    assert health.status_code == 503 and "Redis is unreachable" in health.json()["error"]["message"]
    assert not frontend.seen


def test_error_mapping():
    assert error_of(InvalidInput("top_k: must be >= 0"))[0] == 400
    assert error_of(InvalidInput("top_k: must be >= 0"))[1]["error"]["param"] == "top_k"
    assert error_of(QueueFull("full"))[0] == 429
    assert error_of(NotReady("starting"))[0] == 503
    status, body = error_of(RuntimeError("boom"))
    assert status == 500 and "boom" not in body["error"]["message"]


def test_unknown_route_is_404_in_openai_shape(frontend):
    r = client_of(frontend).get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_models_tokenize_detokenize(frontend):
    client = client_of(frontend)
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 128
    assert client.post("/tokenize", json={"prompt": "ab"}).json() == \
        {"count": 3, "max_model_len": 128, "tokens": [1, 97, 98], "token_strs": None}
    assert client.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False}).json()["tokens"] == [97, 98]
    assert client.post("/tokenize", json={"messages": [{"role": "user", "content": "a"}]}).json()["count"] == 8
    assert client.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    r = client.post("/detokenize", json={"tokens": [5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_a_client_gone_mid_stream_closes_every_choice(frontend):
    """The SSE body is closed when the client goes: each choice's generate runs its cleanup (in the
    real frontend: the cancel that frees its KV blocks)."""
    from services.gateway.openai_http import _EventStream
    from services.gateway.openai_serving import plan_completion, start_stream
    from services.gateway.openai_protocol import CompletionRequest

    async def scenario() -> list[str]:
        frontend.hold = asyncio.Event()            # never set: streams stall after their first chunk
        plan = await plan_completion(frontend, CompletionRequest(prompt="hi", max_tokens=8, n=2, stream=True))
        response = _EventStream(await start_stream(frontend, plan), media_type="text/event-stream")
        sent: list[dict] = []
        gone = asyncio.Event()

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if len(sent) == 3:                      # headers, then two chunks: the client goes
                gone.set()

        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send), 5)
        for _ in range(50):
            if len(frontend.closed) == 2:
                break
            await asyncio.sleep(0.01)
        return frontend.closed

    assert sorted(asyncio.run(scenario())) == sorted(r.request_id for r in frontend.seen)


def test_metrics_merge_labels_each_process_and_reports_the_unreachable():
    registry = CollectorRegistry()
    Counter("duoserve:generation_tokens", "Tokens", ["model_name"], registry=registry).labels(MODEL).inc(4)
    from prometheus_client import generate_latest
    text = generate_latest(registry).decode()
    out = merge({"gateway": text, "decode": text, "arena": None}).decode()
    assert out.count("# TYPE duoserve:generation_tokens_total counter") == 1
    assert f'duoserve:generation_tokens_total{{model_name="{MODEL}",process="decode"}} 4.0' in out
    assert 'duoserve:scrape_up{process="arena"} 0.0' in out and 'process="gateway"' in out


def test_metrics_route_scrapes_peers(frontend):
    registry = CollectorRegistry()
    Counter("duoserve:prompt_tokens", "Prompt tokens", registry=registry).inc(2)
    frontend.metrics = type("M", (), {"registry": registry})()
    r = client_of(frontend, peers=(("decode", "127.0.0.1:9"),)).get("/metrics")     # port 9: nothing there
    assert r.status_code == 200 and 'duoserve:scrape_up{process="decode"} 0.0' in r.text
    assert 'duoserve:prompt_tokens_total{process="gateway"} 2.0' in r.text


def test_gateway_flags():
    config = parse_args(["--redis-url", "redis://x", "--port", "1", "--http-port", "8000",
                         "--peer-metrics", "decode=127.0.0.1:9101", "--peer-metrics", "arena=127.0.0.1:9102"])
    assert config.http_port == 8000 and config.http_host == "127.0.0.1"
    assert config.peer_metrics == (("decode", "127.0.0.1:9101"), ("arena", "127.0.0.1:9102"))
    with pytest.raises(SystemExit):
        parse_args(["--redis-url", "redis://x", "--port", "1", "--peer-metrics", "decode"])


def test_health_watch_through_the_error_interceptor():
    """grpc.health.v1.Health/Watch is a coroutine writing with context.write: the interceptor must keep it one."""
    async def scenario() -> list[int]:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                seen = [(await call.read()).status]
                await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
                seen.append((await call.read()).status)
                call.cancel()
                return seen
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == [health_pb2.HealthCheckResponse.NOT_SERVING,
                                       health_pb2.HealthCheckResponse.SERVING]


def test_fetch_reads_a_large_exposition_to_its_end():
    from prometheus_client import generate_latest, start_http_server
    from services.gateway.stack_metrics import fetch

    registry = CollectorRegistry()
    gauge = Counter("duoserve:many", "Many series", ["i"], registry=registry)
    for i in range(3000):
        gauge.labels(str(i)).inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        text = asyncio.run(fetch(f"127.0.0.1:{server.server_port}"))
    finally:
        server.shutdown()
    assert text == generate_latest(registry).decode() and len(text) > 1 << 17


@pytest.mark.parametrize("raw, where", [
    (b'{"prompt": "a\xffb"}', "prompt"),                                             # a byte that is not UTF-8
    (b'{"prompt": "a\\ud800b"}', "prompt"),                                          # a lone surrogate escape
    (b'{"prompt": "hi", "stop": ["x", "\\udfff"]}', "stop.1"),
    (b'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\xc3("}]}',
     "messages.1.content"),
    (b'{"messages": [{"role": "us\xe9r", "content": "ok"}]}', "messages.0.role"),
])
def test_text_that_is_not_utf8_is_400_naming_the_field(frontend, raw, where):
    route = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = client_of(frontend).post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"{where}: not valid UTF-8") and error["param"] == where, error
    assert not frontend.seen


def test_a_surrogate_pair_is_text_and_bad_bytes_outside_strings_name_the_body(frontend):
    client = client_of(frontend)
    r = client.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["tokens"] == [1, 0x1F600]
    r = client.post("/tokenize", content=b'{"prompt": "a"\xff}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body: not valid UTF-8 (byte 0xff")


def test_bad_json_and_a_body_too_large(frontend):
    client = client_of(frontend)
    r = client.post("/v1/completions", content=b'{"prompt": "a', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert r.json()["error"]["message"].startswith("body: not valid JSON at character 11")
    frontend.config = GatewayConfig("redis://x", "duo", 0, max_body_bytes=100)
    r = client_of(frontend).post("/v1/completions", json={"prompt": "x" * 200})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    assert client_of(frontend).post("/v1/completions", json={"prompt": "x"}).status_code == 200
