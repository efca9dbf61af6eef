"""One OpenAI request over the frontend: its choices, their chunks, and the response bodies.

A request's life here:
  planned    model checked, every prompt tokenized once, max_tokens filled, each choice's sampling
             parameters checked against the context (any error before a single request is queued)
  running    the choices (n per prompt) run as concurrent `Frontend.generate` calls, each in its own
             task; their chunks meet in one queue, in arrival order
  answered   non-streaming: one body once every choice has finished; streaming: one SSE event per
             chunk, then the usage (stream_options.include_usage) and `data: [DONE]`
  cancelled  the client went away (or an error ended the request): every choice's task is cancelled,
             and each generate call's own cleanup publishes its cancel, freeing its KV blocks
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Union

from services.engine.sampling_params import SamplingParams
from services.gateway.errors import GatewayError, ModelNotFound, NotReady
from services.gateway.frontend import Chunk, Frontend, GenerateInput
from services.gateway.openai_protocol import (ChatCompletionRequest, CompletionRequest, error_of,
                                              fill_max_tokens, to_sampling_params)

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}   # vLLM's
_RUNNING: set[asyncio.Task] = set()     # choices' tasks, held until done (the loop keeps weak references)
AnyRequest = Union[CompletionRequest, ChatCompletionRequest]


class GenerationFailed(GatewayError):
    """The engine failed a request after it had started (finish reason "error")."""


def check_model(frontend: Frontend, name: str | None) -> str:
    """The served model's name; a request naming another one is refused (unset means the served one)."""
    if frontend.info is None or frontend.tokenizer is None:
        raise NotReady("the gateway is starting: the model is not loaded yet; retry shortly")
    served = frontend.info.name
    if name and name != served:
        raise ModelNotFound(f"The model `{name}` does not exist.")
    return served


@dataclass
class Plan:
    """A request made ready to run: one GenerateInput per choice, in the API's choice order."""

    kind: str                              # "completion" or "chat"
    id: str                                # cmpl-... / chatcmpl-...
    model: str
    inputs: list[GenerateInput]
    prompt_tokens: int                     # over the distinct prompts (not times n), as vLLM counts
    n: int = 1                             # choices per prompt
    echo: list[str] = field(default_factory=list)   # per choice: text sent before the completion
    logprobs: int | None = None
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


async def plan_completion(frontend: Frontend, req: CompletionRequest) -> Plan:
    req.check()
    model = check_model(frontend, req.model)
    plan = Plan("completion", f"cmpl-{uuid.uuid4().hex}", model, [], 0, logprobs=req.logprobs,
                include_usage=req.stream and bool(req.stream_options and req.stream_options.include_usage))
    for prompt in req.prompts():
        given = GenerateInput("", SamplingParams(), prompt=prompt) if isinstance(prompt, str) \
            else GenerateInput("", SamplingParams(), token_ids=tuple(prompt))
        ids = await frontend.prompt_ids(given)
        _add_choices(frontend, plan, req, ids, req.max_tokens, req.logprobs)
        text = prompt if isinstance(prompt, str) else frontend.tokenizer.decode(ids)
        plan.echo += [text if req.echo else ""] * req.n
    return plan


async def plan_chat(frontend: Frontend, req: ChatCompletionRequest) -> Plan:
    req.check()
    model = check_model(frontend, req.model)
    logprobs = req.num_logprobs()
    plan = Plan("chat", f"chatcmpl-{uuid.uuid4().hex}", model, [], 0, logprobs=logprobs,
                include_usage=req.stream and bool(req.stream_options and req.stream_options.include_usage))
    ids = await frontend.prompt_ids(GenerateInput("", SamplingParams(), messages=req.pairs()))
    _add_choices(frontend, plan, req, ids, req.requested_max_tokens(), logprobs)
    plan.echo += [""] * req.n
    return plan


def _add_choices(frontend: Frontend, plan: Plan, req: AnyRequest, ids: list[int], requested: int | None,
                 logprobs: int | None) -> None:
    max_tokens = fill_max_tokens(requested, len(ids), frontend.info.max_model_len,
                                 frontend.config.max_tokens_limit)
    plan.prompt_tokens += len(ids)
    plan.n = req.n
    for i in range(req.n):
        params = to_sampling_params(req, max_tokens, logprobs, i)
        frontend.check_fits(len(ids), params)
        plan.inputs.append(GenerateInput(f"{plan.id}-{len(plan.inputs)}", params, token_ids=tuple(ids)))


class Fanout:
    """Runs a plan's choices as tasks; `next()` gives their chunks in arrival order."""

    def __init__(self, frontend: Frontend, inputs: list[GenerateInput]) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(inputs)
        self.tasks = [asyncio.create_task(self._run(frontend, i, inp)) for i, inp in enumerate(inputs)]
        for task in self.tasks:
            _RUNNING.add(task)
            task.add_done_callback(_RUNNING.discard)

    async def _run(self, frontend: Frontend, index: int, inp: GenerateInput) -> None:
        try:
            async with contextlib.aclosing(frontend.generate(inp)) as chunks:
                async for chunk in chunks:
                    self.queue.put_nowait((index, chunk))
        except Exception as e:       # noqa: BLE001 - handed to the consumer, which maps it
            self.queue.put_nowait((index, e))
        else:
            self.queue.put_nowait((index, None))

    async def next(self) -> tuple[int, Chunk] | None:
        """The next chunk of any choice, None once all have ended; a choice's error is raised here."""
        while self.remaining:
            index, item = await self.queue.get()
            if item is None:
                self.remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                if item.finish_reason == "error":
                    raise GenerationFailed(f"the engine failed request {item.request_id}; see the worker logs")
                return index, item
        return None

    def cancel(self) -> None:
        """Synchronous (it may run in a cancelled task): each task's generate publishes its own cancel."""
        for task in self.tasks:
            task.cancel()


# ------------------------------------------------------------------ response bodies
def _usage(plan: Plan, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _token_text(frontend: Frontend, token_id: int) -> str:
    return frontend.tokenizer.decode([token_id])


def chat_logprobs(frontend: Frontend, chunk: Chunk, k: int) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def entry(token_id: int, logprob: float) -> dict:
        text = _token_text(frontend, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:k]]}
                        for lp in chunk.logprobs]}


def completion_logprobs(frontend: Frontend, chunk: Chunk, offset: int) -> dict:
    """The legacy shape: parallel lists of tokens, logprobs, top alternatives and text offsets."""
    tokens, offsets = [], []
    for lp in chunk.logprobs:
        tokens.append(_token_text(frontend, lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in chunk.logprobs],
            "top_logprobs": [{_token_text(frontend, t): v for t, v in ((lp.token_id, lp.logprob), *lp.top)}
                             for lp in chunk.logprobs],
            "text_offset": offsets}


def _merge_logprobs(kind: str, into: dict | None, more: dict) -> dict:
    if into is None:
        return more
    key_lists = ("content",) if kind == "chat" else ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: into[k] + more[k] for k in key_lists}


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: dict | None = None
    chars: int = 0                          # text sent so far (completion logprobs' text offsets)
    cached_tokens: int = 0                  # its prompt's tokens found in the prefix cache (last usage)
    started: bool = False                   # its first chunk is out (echo goes before it)


class Renderer:
    """Turns a plan's chunks into OpenAI's bodies, keeping each choice's running state."""

    def __init__(self, frontend: Frontend, plan: Plan) -> None:
        self.frontend, self.plan = frontend, plan
        self.choices = [_Choice() for _ in plan.inputs]

    def _take(self, index: int, chunk: Chunk) -> tuple[str, dict | None]:
        choice = self.choices[index]
        text = chunk.text
        if not choice.started:
            text = self.plan.echo[index] + text
            choice.started = True
        logprobs = None
        if self.plan.logprobs is not None and chunk.token_ids:
            logprobs = chat_logprobs(self.frontend, chunk, self.plan.logprobs) if self.plan.kind == "chat" \
                else completion_logprobs(self.frontend, chunk, choice.chars + len(text) - len(chunk.text))
            choice.logprobs = _merge_logprobs(self.plan.kind, choice.logprobs, logprobs)
        choice.text += text
        choice.chars += len(text)
        choice.completion_tokens += len(chunk.token_ids)
        if chunk.finish_reason:
            choice.finish_reason = FINISH_REASONS.get(chunk.finish_reason, chunk.finish_reason)
        if chunk.usage is not None:
            choice.cached_tokens = chunk.usage.cached_tokens
        return text, logprobs

    def _head(self, obj: str) -> dict:
        return {"id": self.plan.id, "object": obj, "created": self.plan.created, "model": self.plan.model}

    def usage(self) -> dict:
        # Prompt tokens count once per distinct prompt (as vLLM): so do cached ones, the fewest any of its
        # choices found (n > 1: the first computes the prompt, the others reuse its blocks; counted once,
        # the prompt was computed but for what was cached before it came).
        n = self.plan.n
        cached = sum(min(c.cached_tokens for c in self.choices[i:i + n]) for i in range(0, len(self.choices), n))
        return _usage(self.plan, sum(c.completion_tokens for c in self.choices), cached)

    # streaming
    def start_events(self) -> list[dict]:
        if self.plan.kind != "chat":
            return []
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(len(self.choices))]

    def event(self, index: int, chunk: Chunk) -> dict | None:
        text, logprobs = self._take(index, chunk)
        finish = self.choices[index].finish_reason
        if not text and not finish and logprobs is None:
            return None
        if self.plan.kind == "chat":
            choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                      "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, "stop_reason": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_event(self) -> dict:
        obj = "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}

    # whole
    def take(self, index: int, chunk: Chunk) -> None:
        self._take(index, chunk)

    def body(self) -> dict:
        if self.plan.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": c.logprobs,
                        "finish_reason": c.finish_reason} for i, c in enumerate(self.choices)]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}
        choices = [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": None} for i, c in enumerate(self.choices)]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage()}


async def complete(frontend: Frontend, plan: Plan) -> dict:
    """Non-streaming: every choice to its end, one body."""
    fanout = Fanout(frontend, plan.inputs)
    renderer = Renderer(frontend, plan)
    try:
        while (item := await fanout.next()) is not None:
            renderer.take(*item)
    finally:
        fanout.cancel()          # no-op for finished choices; an error or a disconnect stops the others
    return renderer.body()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


async def start_stream(frontend: Frontend, plan: Plan) -> AsyncIterator[str]:
    """Streaming: runs until the first chunk, so that a refused request (full queue, bad input) is
    still an HTTP error; returns the SSE events of the rest."""
    fanout = Fanout(frontend, plan.inputs)
    try:
        first = await fanout.next()
    except BaseException:
        fanout.cancel()
        raise
    return _events(Renderer(frontend, plan), fanout, first)


async def _events(renderer: Renderer, fanout: Fanout, item: tuple[int, Chunk] | None) -> AsyncIterator[str]:
    try:
        for event in renderer.start_events():
            yield sse(event)
        while item is not None:
            if (event := renderer.event(*item)) is not None:
                yield sse(event)
            item = await fanout.next()
        if renderer.plan.include_usage:
            yield sse(renderer.usage_event())
    except Exception as e:        # noqa: BLE001 - headers are sent: the error goes as an event (as vLLM)
        yield sse(error_of(e)[1])
    finally:
        fanout.cancel()          # the client went away, or an error: every choice stops and frees its blocks
    yield sse("[DONE]")
