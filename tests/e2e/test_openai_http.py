"""The gateway's OpenAI-compatible HTTP API on a real split stack, with the official `openai` client:
the same greedy text as the gRPC API, streaming (sync and async), n, stop strings, token-id prompts,
errors, a client gone mid-stream (its blocks come back), and the other routes."""
from __future__ import annotations

import asyncio
import http.client
import json
import time
from urllib.parse import urlsplit

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import duoserve

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def http_url(split_stack) -> str:
    assert split_stack.state.http_url, "duoserve up recorded no HTTP API"
    return split_stack.state.http_url


@pytest.fixture(scope="module")
def client(http_url):
    with openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", timeout=300, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def grpc_client(split_stack):
    with duoserve.Client(split_stack.target, timeout=300) as c:
        yield c


def test_greedy_text_equals_the_grpc_api(client, model, grpc_client):
    chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    expected = grpc_client.generate(messages=QUESTION, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == expected.text and chat.id.startswith("chatcmpl-")
    assert chat.usage.completion_tokens == len(expected.token_ids)
    assert chat.usage.prompt_tokens == expected.usage.prompt_tokens
    assert chat.choices[0].finish_reason == expected.finish_reason

    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    expected = grpc_client.generate(PROMPT, max_tokens=16, temperature=0)
    assert text.choices[0].text == expected.text and text.id.startswith("cmpl-")
    ids = grpc_client.tokenize(PROMPT)
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == expected.text


def test_streams_sync_and_async_give_the_same_text(client, model, http_url):
    whole = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="unused", timeout=300) as aclient:
            stream = await aclient.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                                      stream=True)
            return "".join([c.choices[0].text async for c in stream if c.choices])

    assert asyncio.run(run()) == client.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                                           temperature=0).choices[0].text


def test_n_choices_stop_strings_and_seeds(client, model):
    two = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, n=2, seed=7,
                                    temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 24
    again = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, n=2, seed=7,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in two.choices]      # seed + i per choice

    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = whole.strip().split()[1]                     # a word inside the greedy completion
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert whole.startswith(cut.choices[0].text)


def test_errors_name_the_field(client, model):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="hi", temperature=-1)
    assert bad.value.body["param"] == "temperature" and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1_000_000)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="hi")
    assert missing.value.body == {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError",
                                  "param": "model", "code": 404}


class Http:
    """Plain HTTP/1.1 to the gateway (the standard library's client: what a curl user sees)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, str]:
        self.conn.request(method, path, body=None if body is None else json.dumps(body),
                          headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        status, _, text = self.call(method, path, body)
        assert status == 200, text
        return json.loads(text)


def test_a_client_gone_mid_stream_frees_its_blocks(split_stack, http_url, model):
    start_free = split_stack.num_free_blocks()
    body = {"model": model, "prompt": "Tell me a very long story about a dragon.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    client = Http(http_url)
    client.conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = client.conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 8:
        events += response.readline().startswith(b"data: ")
    assert split_stack.num_free_blocks() < start_free                 # it holds blocks now
    client.conn.close()                                               # gone, mid-stream
    assert split_stack.wait_free_blocks(start_free) == start_free


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_before_any_response_frees_its_blocks(split_stack, http_url, model, stream):
    """A non-streaming request (no response until its end) cancels too; a stream, whichever side of its
    first token the close lands."""
    start_free = split_stack.num_free_blocks()
    body = {"model": model, "prompt": "Tell me a very long story about a dragon.", "max_tokens": 1800,
            "ignore_eos": True, "stream": stream}          # ~2 minutes to finish: the blocks must come back sooner
    client = Http(http_url)
    client.conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while split_stack.num_free_blocks() == start_free:                # running (or queued and prefilling)
        assert time.monotonic() < deadline, "the request never took blocks"
        time.sleep(0.05)
    client.conn.close()                                               # gone before any response
    assert split_stack.wait_free_blocks(start_free, timeout=30) == start_free


def test_health_models_tokenize_detokenize_metrics(http_url, model, grpc_client):
    client = Http(http_url)
    assert client.call("GET", "/health")[0] == 200
    models = client.json("GET", "/v1/models")
    assert models["data"][0]["id"] == model and models["data"][0]["max_model_len"] > 0
    tokens = client.json("POST", "/tokenize", {"model": model, "prompt": PROMPT})
    assert tokens["tokens"] == grpc_client.tokenize(PROMPT) and tokens["count"] == len(tokens["tokens"])
    assert client.json("POST", "/detokenize", {"tokens": tokens["tokens"]})["prompt"].endswith(PROMPT)
    chat = client.json("POST", "/tokenize", {"messages": QUESTION})
    assert chat["count"] > tokens["count"]                                 # the chat template's tokens
    status, headers, text = client.call("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'process="decode"' in text and "duoserve:iteration_seconds_bucket" in text
    assert 'process="gateway"' in text and 'duoserve:scrape_up{process="decode"} 1.0' in text
    status, _, text = client.call("GET", "/v1/nothing-here")
    assert status == 404 and json.loads(text)["error"]["code"] == 404


def test_health_watch_on_the_gateway(split_stack):
    with grpc.insecure_channel(split_stack.target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()


def test_logprobs_in_both_shapes_match_the_grpc_api(client, model, grpc_client):
    expected = grpc_client.generate(messages=QUESTION, max_tokens=8, temperature=0, logprobs=2)
    chat = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == len(expected.logprobs)
    for got, want in zip(content, expected.logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([v for _, v in want.top], abs=1e-3)
        assert got.top_logprobs[0].token == got.token and bytes(got.bytes) == got.token.encode()   # greedy
    assert "".join(c.token for c in content) == chat.choices[0].message.content

    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert all(token in top and len(top) == 2 for token, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_penalties_and_min_tokens_reach_the_engine(client, model, grpc_client):
    prompt, greedy = "Repeat after me: la la la la la la la la", dict(max_tokens=24, temperature=0)
    penalties = dict(frequency_penalty=2.0, presence_penalty=1.0)
    plain = client.completions.create(model=model, prompt=prompt, **greedy).choices[0].text
    penalized = client.completions.create(model=model, prompt=prompt, **greedy, **penalties,
                                          extra_body={"repetition_penalty": 1.5}).choices[0].text
    assert penalized == grpc_client.generate(prompt, **greedy, **penalties, repetition_penalty=1.5).text
    assert penalized != plain
    free = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 12
    held = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0,
                                          extra_body={"min_tokens": 12})
    assert held.choices[0].finish_reason == "length" and held.usage.completion_tokens == 12


def test_the_sdk_says_when_a_port_is_not_the_gateways(split_stack, http_url):
    """A worker's gRPC port and the HTTP port, given to the SDK by mistake, are named for what they are."""
    decode = split_stack.process("decode")
    with duoserve.Client(f"127.0.0.1:{decode.port}", timeout=10) as wrong:
        with pytest.raises(duoserve.errors.DuoserveError, match="is not a duoserve gateway"):
            wrong.generate("hi", max_tokens=1)
    with duoserve.Client(urlsplit(http_url).netloc, timeout=10) as wrong:
        with pytest.raises(duoserve.errors.DuoserveError, match="speaks HTTP/1"):
            wrong.generate("hi", max_tokens=1)
