"""Hypothesis strategies for the HTTP API's part of the fuzz (test_fuzz.py): JSON bodies, each with
the status it must get and the field its error message must start with.

A case is a valid completions or chat request (max_tokens 1 or 2, n 1 or 2, streamed or not) with at
most one fault: a string with bytes that are not UTF-8 or a lone surrogate escape, a value out of
range or of the wrong type, or a body that is not JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.chaos.fuzz_requests import ROLES

HOLE = "@@HOLE@@"                          # replaced in the JSON text by the fault's bytes
BAD_TEXT = (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\\ud800", b"\\udfff x", b"a\\udbff")


@dataclass(frozen=True)
class HttpCase:
    route: str                      # "/v1/completions" or "/v1/chat/completions"
    body: bytes
    status: int                     # what it must get
    field: str | tuple[str, ...] | None = None   # the error message starts with it (or one of them)
    what: str = "valid"


def _text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_characters="@", codec="utf-8"), max_size=max_size)


@st.composite
def valid_body(draw, vocab_size: int) -> tuple[str, dict]:
    body: dict = {"max_tokens": draw(st.integers(1, 2)), "n": draw(st.integers(1, 2)), "stream": draw(st.booleans())}
    if draw(st.booleans()):
        body["temperature"] = draw(st.floats(0, 2))
    if draw(st.booleans()):
        body["top_p"] = draw(st.floats(0, 1, exclude_min=True))
    if draw(st.booleans()):
        body["seed"] = draw(st.integers(0, 1 << 31))
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(_text(6).filter(bool), min_size=1, max_size=2))
    if draw(st.booleans()):
        body["user"] = draw(_text(8))
    if draw(st.booleans()):
        messages = draw(st.lists(st.tuples(st.sampled_from(ROLES), _text(20)), min_size=1, max_size=3))
        body["messages"] = [{"role": r, "content": c} for r, c in messages]
        return "/v1/chat/completions", body
    if draw(st.booleans()):
        body["prompt"] = draw(st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=16))
    else:
        body["prompt"] = draw(_text(30).filter(str.strip))
    return "/v1/completions", body


def _holes(route: str, body: dict) -> list[tuple[str, tuple]]:
    """(the error's path, where in the body) of each string that can hold a fault."""
    holes = [("user", ("user",)), ("model", ("model",))]
    if route.endswith("chat/completions"):
        holes += [(f"messages.{i}.{k}", ("messages", i, k)) for i in range(len(body["messages"]))
                  for k in ("role", "content")]
    elif isinstance(body["prompt"], str):
        holes.append(("prompt", ("prompt",)))
    holes += [(f"stop.{i}", ("stop", i)) for i in range(len(body.get("stop", ())))]
    return holes


def _put(body: dict, where: tuple, value: str) -> None:
    target = body
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value


@st.composite
def bad_text(draw, vocab_size: int) -> HttpCase:
    route, body = draw(valid_body(vocab_size))
    path, where = draw(st.sampled_from(_holes(route, body)))
    _put(body, where, "ok" + HOLE)
    raw = json.dumps(body, ensure_ascii=False).encode().replace(HOLE.encode(), draw(st.sampled_from(BAD_TEXT)))
    return HttpCase(route, raw, 400, path, "utf8")


BAD_VALUES = [("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 5000), ("n", 0), ("n", 17),
              ("temperature", -1.0), ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.5), ("seed", "x"),
              ("stop", [""]), ("stop", ["x" * 300]), ("stop", 5), ("presence_penalty", 3.0),
              ("repetition_penalty", 0.0), ("top_k", -7), ("min_tokens", -1), ("stream_options", {"include_usage": True}),
              ("prompt", ""), ("prompt", []), ("prompt", [-1]), ("prompt", [[]]), ("messages", []),
              ("messages", [{"role": "robot", "content": "x"}]), ("messages", "hi"), ("model", "gpt-4")]


@st.composite
def bad_value(draw, vocab_size: int) -> HttpCase:
    route, body = draw(valid_body(vocab_size))
    field, value = draw(st.sampled_from(BAD_VALUES))
    chat = route.endswith("chat/completions")
    if field == "prompt" and chat or field == "messages" and not chat:
        route = "/v1/completions" if field == "prompt" else "/v1/chat/completions"
        body.pop("messages" if field == "prompt" else "prompt", None)
    body[field] = value
    if field == "stream_options":
        body["stream"] = False                       # options without a stream
    expect = None if field == "model" else ("prompt", "token_ids") if value == [-1] else field
    return HttpCase(route, json.dumps(body).encode(), 404 if field == "model" else 400, expect, "value")


@st.composite
def not_json(draw, vocab_size: int) -> HttpCase:
    route, body = draw(valid_body(vocab_size))
    raw = json.dumps(body).encode()
    return HttpCase(route, raw[:draw(st.integers(1, len(raw) - 1))], 400, None, "json")


@st.composite
def http_cases(draw, vocab_size: int) -> HttpCase:
    """About one valid request in seven; the rest faults."""
    kind = draw(st.sampled_from(("utf8", "value", "utf8", "value", "utf8", "json", "valid")))
    if kind == "valid":
        route, body = draw(valid_body(vocab_size))
        return HttpCase(route, json.dumps(body).encode(), 200)
    return draw({"utf8": bad_text, "value": bad_value, "json": not_json}[kind](vocab_size))
