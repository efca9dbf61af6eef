"""Hypothesis strategies for the public API's fuzz (test_fuzz.py): requests as bytes, each with what
the gateway must answer.

A case is a valid request (short prompt, messages or token ids; max_tokens 1 or 2; every sampling
field drawn from its valid range, extremes included) with at most one fault: a string field made
invalid UTF-8 (on the wire: the SDK cannot send it), a value out of range, an input too large, or
bytes that are not the message at all. `expect` is the status it must get and the field its
message must start with.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from hypothesis import strategies as st

from duoserve.v1 import generation_pb2 as pb

ROLES = ("system", "user", "assistant", "tool")
VALID = ("OK",)
MARK = "\U0010fffe" * 2                   # 8 bytes where invalid ones go: never in generated text, nor in
                                          # a varint (all 8 bytes have the high bit) or, but by a fluke, a double
BAD_UTF8 = (b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80", b"\xe2\x82")
ANY_END = ("OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")   # bytes that may parse


@dataclass(frozen=True)
class Case:
    method: str                     # "Generate", "Tokenize" or "GetModelInfo"
    data: bytes                     # the serialized request (possibly not a valid one)
    codes: tuple[str, ...]          # the statuses allowed
    field: str | None = None        # the message must start with it (INVALID_ARGUMENT)
    what: str = "valid"             # the fault, for the test's tally


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    kv_tokens: int                  # the KV pool's tokens
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 1 << 20


def _text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_characters=MARK[0], codec="utf-8"), max_size=max_size)


@st.composite
def sampling(draw) -> pb.SamplingParams:
    """Every field in its valid range, the edges included (inf temperature, tiny top_p, ...)."""
    sp = pb.SamplingParams(max_tokens=draw(st.integers(1, 2)))
    if draw(st.booleans()):
        sp.temperature = draw(st.one_of(st.just(0.0), st.floats(0, 2), st.floats(0, allow_infinity=True)))
    if draw(st.booleans()):
        sp.top_p = draw(st.floats(0, 1, exclude_min=True))
    if draw(st.booleans()):
        sp.top_k = draw(st.integers(0, 1 << 20))
    if draw(st.booleans()):
        sp.seed = draw(st.integers(-(1 << 63), (1 << 63) - 1))
    sp.stop.extend(draw(st.lists(_text(8).filter(bool), max_size=3)))
    sp.ignore_eos = draw(st.booleans())
    for name in ("presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(sp, name, draw(st.floats(-2, 2)))
    if draw(st.booleans()):
        sp.repetition_penalty = draw(st.floats(0, exclude_min=True, allow_infinity=False))
    if draw(st.booleans()):
        sp.min_tokens = draw(st.integers(0, sp.max_tokens))
    if draw(st.booleans()):
        sp.logprobs = draw(st.integers(0, 20))
    return sp


@st.composite
def valid_request(draw, limits: Limits) -> pb.GenerateRequest:
    req = pb.GenerateRequest(sampling=draw(sampling()))
    req.sampling.stop_token_ids.extend(draw(st.lists(st.integers(0, limits.vocab_size - 1), max_size=4)))
    kind = draw(st.sampled_from(("prompt", "messages", "token_ids")))
    if kind == "prompt":
        req.prompt = draw(_text(40).filter(str.strip))
    elif kind == "messages":
        for role, content in draw(st.lists(st.tuples(st.sampled_from(ROLES), _text(30)), min_size=1, max_size=3)):
            req.messages.messages.add(role=role, content=content)
    else:
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, limits.vocab_size - 1), min_size=1, max_size=32)))
    if draw(st.booleans()):
        req.request_id = f"fz-{uuid.uuid4().hex[:12]}"     # unique: a finished id may still be releasing
    req.priority = draw(st.integers(-(1 << 31), (1 << 31) - 1))
    req.slo_class = draw(_text(10))
    return req


# ------------------------------------------------------------------ faults
def _break(data: bytes, bad: bytes) -> bytes:
    """The serialized MARK replaced by as many bytes ending in `bad` (the field's length stays right)."""
    mark = MARK.encode()
    assert data.count(mark) == 1
    return data.replace(mark, b"M" * (len(mark) - len(bad)) + bad)


def _utf8_targets(req: pb.GenerateRequest) -> list[tuple[str, object, str]]:
    """(path in the error, message holding the field, field name) of each string field to break."""
    targets = [("request_id", req, "request_id"), ("slo_class", req, "slo_class")]
    if req.WhichOneof("input") == "prompt":
        targets.append(("prompt", req, "prompt"))
    for i, message in enumerate(req.messages.messages):
        targets += [(f"messages.messages[{i}].role", message, "role"),
                    (f"messages.messages[{i}].content", message, "content")]
    return targets


@st.composite
def bad_utf8(draw, limits: Limits) -> Case:
    req = draw(valid_request(limits))
    targets = _utf8_targets(req) + [("sampling.stop", None, "stop")]
    path, holder, name = draw(st.sampled_from(targets))
    if name == "stop":
        req.sampling.stop.append(MARK)
        path = f"sampling.stop[{len(req.sampling.stop) - 1}]"
    else:
        setattr(holder, name, MARK)
    bad = draw(st.sampled_from(BAD_UTF8))
    data = _break(req.SerializeToString(), bad)
    return Case("Generate", data, ("INVALID_ARGUMENT",), path, "utf8")


def _value_faults(limits: Limits, max_tokens: int) -> list[tuple[str, str, object]]:
    """(field in the error, sampling attribute, a value out of its range)."""
    nan, inf = math.nan, math.inf
    faults = [("max_tokens", "max_tokens", v) for v in (0, -1, -(1 << 31), limits.max_tokens_limit + 1)]
    faults += [("temperature", "temperature", v) for v in (-1e-9, -inf, nan)]
    faults += [("top_p", "top_p", v) for v in (0.0, -0.5, 1.0000001, nan, inf)]
    faults += [("top_k", "top_k", v) for v in (-1, -(1 << 31))]
    faults += [(name, name, v) for name in ("presence_penalty", "frequency_penalty") for v in (2.0001, -3.0, nan, inf)]
    faults += [("repetition_penalty", "repetition_penalty", v) for v in (0.0, -1.0, nan, inf)]
    faults += [("min_tokens", "min_tokens", v) for v in (-1, max_tokens + 1)]
    faults += [("logprobs", "logprobs", v) for v in (-1, 21, (1 << 31) - 1)]
    return faults


@st.composite
def bad_value(draw, limits: Limits) -> Case:
    req = draw(valid_request(limits))
    field, attr, value = draw(st.sampled_from(_value_faults(limits, req.sampling.max_tokens)))
    if attr == "min_tokens" and value > req.sampling.max_tokens:
        req.sampling.ClearField("min_tokens")
    setattr(req.sampling, attr, value)
    return Case("Generate", req.SerializeToString(), ("INVALID_ARGUMENT",), field, "value")


def _list_faults(limits: Limits) -> list[tuple[str, str, object]]:
    """(field in the error, what to set, its value): strings, lists and inputs out of bounds."""
    big = limits.max_prompt_chars + 1
    return [
        ("stop", "stop", [""]), ("stop", "stop", ["x" * 257]), ("stop", "stop", ["a"] * 17),
        ("stop_token_ids", "stop_token_ids", [-1]), ("stop_token_ids", "stop_token_ids", [limits.vocab_size]),
        ("stop_token_ids", "stop_token_ids", [0] * 65),
        ("request_id", "request_id", "x" * 129), ("request_id", "request_id", "a\nb"),
        ("request_id", "request_id", "\x00"),
        ("prompt", "prompt", ""), ("prompt", "prompt", " \n\t "), ("prompt", "prompt", "x" * big),
        ("prompt", "prompt", "hello " * (limits.max_model_len * 2)),             # tokens beyond the context
        ("prompt", "no_input", None),
        ("token_ids", "token_ids", []), ("token_ids", "token_ids", [-1]),
        ("token_ids", "token_ids", [limits.vocab_size]), ("token_ids", "token_ids", [5] * limits.max_model_len),
        ("prompt", "token_ids", [5] * (limits.kv_tokens + 1)),                    # more than the KV pool
        ("messages", "messages", []), ("messages", "messages", [("user", "hi")] * 257),
        ("messages[0].role", "messages", [("robot", "hi")]), ("messages", "messages", [("user", "y" * big)]),
        ("text", "tokenize", "z" * big),
    ]


@st.composite
def bad_input(draw, limits: Limits) -> Case:
    req = draw(valid_request(limits))
    field, what, value = draw(st.sampled_from(_list_faults(limits)))
    if what == "tokenize":
        return Case("Tokenize", pb.TokenizeRequest(text=value).SerializeToString(), ("INVALID_ARGUMENT",),
                    field, "size")
    if what in ("stop", "stop_token_ids"):
        getattr(req.sampling, what)[:] = value
    elif what in ("request_id", "prompt"):
        setattr(req, what, value)
    elif what == "token_ids":
        req.token_ids.Clear()
        req.token_ids.ids.extend(value)
        req.token_ids.SetInParent()
    elif what == "messages":
        req.messages.Clear()
        for role, content in value:
            req.messages.messages.add(role=role, content=content)
        req.messages.SetInParent()
    else:
        req.ClearField(req.WhichOneof("input"))
    return Case("Generate", req.SerializeToString(), ("INVALID_ARGUMENT",), field, "size")


@st.composite
def corrupt_bytes(draw, limits: Limits) -> Case:
    """Sampling first (fields may come in any order), then an input the gateway refuses (an id outside
    the vocabulary): what still parses after the damage is mostly refused, seldom run (then briefly)."""
    req = draw(valid_request(limits))
    data = (pb.GenerateRequest(sampling=req.sampling).SerializeToString()
            + pb.GenerateRequest(token_ids=pb.TokenIds(ids=[limits.vocab_size])).SerializeToString())
    how = draw(st.sampled_from(("cut", "flip", "insert", "random")))
    if how == "random":
        data = draw(st.binary(max_size=64))
    elif how == "cut":
        data = data[:draw(st.integers(0, len(data) - 1))]
    else:
        at = draw(st.integers(0, len(data) - 1))
        piece = bytes([draw(st.integers(0, 255))]) if how == "flip" else draw(st.binary(min_size=1, max_size=8))
        data = data[:at] + piece + data[at + (how == "flip"):]
    return Case("Generate", data, ANY_END, None, "bytes")


@st.composite
def other_method(draw, limits: Limits) -> Case:
    text = draw(_text(40))
    if draw(st.booleans()):
        return Case("Tokenize", pb.TokenizeRequest(text=text).SerializeToString(), VALID)
    if draw(st.booleans()):
        data = _break(pb.TokenizeRequest(text=MARK).SerializeToString(), b"\xff")
        return Case("Tokenize", data, ("INVALID_ARGUMENT",), "text", "utf8")
    return Case("GetModelInfo", draw(st.binary(max_size=16)), ("OK", "INVALID_ARGUMENT"), None, "bytes")


@st.composite
def cases(draw, limits: Limits) -> Case:
    """About one valid request in ten (they run: the fuzz's time goes there); the rest faults of every kind."""
    kinds = {"utf8": bad_utf8, "value": bad_value, "size": bad_input, "bytes": corrupt_bytes, "other": other_method}
    kind = draw(st.sampled_from((*kinds, *kinds, "valid")))
    if kind == "valid":
        return Case("Generate", draw(valid_request(limits)).SerializeToString(), VALID)
    return draw(kinds[kind](limits))
