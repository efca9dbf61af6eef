"""The load generator's two clients: duoserve's gateway (gRPC) and any OpenAI-compatible server (HTTP).

`bench serve` times whatever `open_client(target)` returns through one small interface:
  stream(spec)   the request's chunks as StreamChunk: tokens in the chunk, finish reason, usage;
                 with answer_ids=True each chunk's token ids too, where the server can say them
                 (a multi-turn conversation puts the answer into its next turn's prompt)
  tokenize(text) the server's token ids for `text`
  model_info()   limits the workload must fit: max_context, and for duoserve the KV pool
  close()

A request's life in the OpenAI client (what vLLM's benchmarks/lib/endpoint_request_func.py does):
  sent       POST /v1/completions: prompt as token ids, max_tokens, ignore_eos, temperature 0,
             stream with stream_options.include_usage (answer_ids: return_token_ids, vLLM's)
  refused    HTTP 4xx/5xx: ServerError with the status and the body's message (a failed request)
  streaming  SSE events split on blank lines; each event with choices is one token event (its text
             may be empty, e.g. a special token), as vLLM counts them; `data: {"error": ...}` fails it
  counted    the final usage event's completion_tokens is the request's token count, its
             prompt_tokens_details.cached_tokens the prompt tokens found in the prefix cache
  done       `data: [DONE]` or the end of the body
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from bench.datasets import RequestSpec


class ServerError(Exception):
    """The server refused a call or reported an error in the stream."""


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One streamed event of a request, reduced to what the benchmark times and counts."""

    num_tokens: int                         # tokens this event carries (0: a usage-only or empty event)
    finish_reason: str | None = None        # "length", "stop", "error", ... on the request's last token event
    completion_tokens: int | None = None    # the server's count of generated tokens (usage), when it gives one
    prompt_tokens: int | None = None        # the server's count of prompt tokens (usage)
    cached_tokens: int | None = None        # of those, found in the server's prefix cache (usage), when it says
    token_ids: tuple[int, ...] = ()         # the tokens this event carries, when the server gives them
    text: str = ""                          # their text (OpenAI servers)


class BenchClient(Protocol):
    def stream(self, spec: RequestSpec, *, answer_ids: bool = False) -> AsyncIterator[StreamChunk]: ...
    async def tokenize(self, text: str) -> list[int]: ...
    async def model_info(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


def is_http_target(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def open_client(target: str, timeout_s: float, *, api_key: str | None = None, tls: Any = None,
                server_name: str | None = None) -> BenchClient:
    """`http(s)://HOST:PORT`: an OpenAI-compatible server; `HOST:PORT`: a duoserve gateway. `api_key` goes as
    `Authorization: Bearer`; `tls` (the SDK's: True or a CA file) checks the server's certificate."""
    if is_http_target(target):
        return OpenAIClient(target, timeout_s, api_key=api_key, ca_file=tls if isinstance(tls, str) else None)
    return GatewayClient(target, timeout_s, api_key=api_key, tls=tls, server_name=server_name)


class GatewayClient:
    """duoserve's gateway through the SDK's AsyncClient."""

    def __init__(self, target: str, timeout_s: float, *, api_key: str | None = None, tls: Any = None,
                 server_name: str | None = None) -> None:
        import duoserve
        self._client = duoserve.AsyncClient(target, timeout=timeout_s, api_key=api_key, tls=tls,
                                            server_name=server_name)

    async def stream(self, spec: RequestSpec, *, answer_ids: bool = False) -> AsyncIterator[StreamChunk]:
        prompt = {"prompt": spec.prompt} if spec.prompt is not None else {"token_ids": list(spec.token_ids or ())}
        async with self._client.stream(**prompt, max_tokens=spec.output_len, ignore_eos=True,
                                       temperature=0.0) as chunks:
            async for chunk in chunks:          # the gateway always streams token ids: answer_ids asks nothing more
                usage = chunk.usage
                yield StreamChunk(len(chunk.token_ids), chunk.finish_reason,
                                  usage.completion_tokens if usage else None, usage.prompt_tokens if usage else None,
                                  usage.cached_tokens if usage else None, tuple(chunk.token_ids))

    async def tokenize(self, text: str) -> list[int]:
        return await self._client.tokenize(text)

    async def model_info(self) -> dict[str, Any]:
        return await self._client.model_info()

    async def close(self) -> None:
        await self._client.close()


class OpenAIClient:
    """An OpenAI-compatible completions server (vLLM's `api_server`, SGLang, ...)."""

    def __init__(self, base_url: str, timeout_s: float, *, api_key: str | None = None,
                 ca_file: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.ca_file = ca_file              # https: check the server's certificate against this CA
        self._session: Any = None           # aiohttp.ClientSession, opened in the running loop on first use
        self._model: str | None = None      # the served model's id (/v1/models), which requests must name

    def _http(self) -> Any:
        import aiohttp                      # the `bench` extra; imported here so the gRPC path needs none
        if self._session is None:
            # limit=0: no cap on open connections; the default 100 would queue requests in the client
            # under open-loop load and count that wait as server latency.
            import ssl
            context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ssl=context if context else True),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=self.headers)
        return self._session

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self._http().request(method, self.base_url + path, json=body) as response:
            text = await response.text()
            if response.status >= 400:
                raise ServerError(f"{method} {path}: HTTP {response.status}: {_error_message(text)}")
        return json.loads(text)

    async def model_info(self) -> dict[str, Any]:
        models = (await self._json("GET", "/v1/models")).get("data") or []
        if not models:
            raise ServerError(f"{self.base_url}/v1/models lists no model")
        self._model = models[0]["id"]
        # vLLM adds max_model_len; the KV pool is not exposed (None: _prepare skips that check).
        return {"model": self._model, "max_context": models[0].get("max_model_len"),
                "num_kv_blocks": None, "block_size": None}

    async def tokenize(self, text: str) -> list[int]:
        """vLLM's /tokenize (not part of the OpenAI API; other servers may lack it)."""
        body = {"model": await self._model_id(), "prompt": text}
        return list((await self._json("POST", "/tokenize", body))["tokens"])

    async def _model_id(self) -> str:
        if self._model is None:
            await self.model_info()
        return self._model or ""

    async def stream(self, spec: RequestSpec, *, answer_ids: bool = False) -> AsyncIterator[StreamChunk]:
        body = {"model": await self._model_id(),
                "prompt": spec.prompt if spec.prompt is not None else list(spec.token_ids or ()),
                "max_tokens": spec.output_len, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if answer_ids:                      # vLLM's extension; a server without it sends text only
            body["return_token_ids"] = True
        async with self._http().post(self.base_url + "/v1/completions", json=body) as response:
            if response.status >= 400:
                raise ServerError(f"HTTP {response.status}: {_error_message(await response.text())}")
            events = SSEDecoder()
            async for data in response.content.iter_any():
                for event in events.feed(data):
                    if event == "[DONE]":
                        return
                    chunk = parse_completion_event(event)
                    if chunk is not None:
                        yield chunk

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SSEDecoder:
    """Bytes of a text/event-stream in, the `data:` payloads of whole events out (comments dropped)."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")()   # a character may straddle two reads
        self._buffer = ""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._text.decode(data).replace("\r\n", "\n")
        *events, self._buffer = self._buffer.split("\n\n")
        out = []
        for event in events:
            lines = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
            if lines:
                out.append("\n".join(lines))
        return out


def parse_completion_event(payload: str) -> StreamChunk | None:
    """One completions stream event -> a StreamChunk (None: nothing the benchmark reads)."""
    data = json.loads(payload)
    if "error" in data:
        raise ServerError(_error_message(payload))
    choices = data.get("choices") or []
    usage = data.get("usage") or {}
    if not choices and not usage:
        return None
    # Each event with choices is one token event, as vLLM's benchmark counts them; a server that
    # returns token ids (vLLM with return_token_ids) says how many the event carries.
    ids = tuple(choices[0].get("token_ids") or ()) if choices else ()
    num_tokens = (len(ids) or 1) if choices else 0
    details = usage.get("prompt_tokens_details") or {}
    return StreamChunk(num_tokens, choices[0].get("finish_reason") if choices else None,
                       usage.get("completion_tokens"), usage.get("prompt_tokens"), details.get("cached_tokens"),
                       ids, (choices[0].get("text") or "") if choices else "")


def _error_message(body: str) -> str:
    """The message of an OpenAI error body ({"error": {"message": ...}} or {"message": ...}), else the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300] or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]
