"""The SDK's data: the dataclasses a caller gets (Chunk, Completion, Usage, TokenLogprob) and the
conversions between keyword arguments / those dataclasses and the Generation API's protobuf messages.
Pure: no I/O, no channel (duoserve.client and duoserve.async_client use it).
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from duoserve import errors
from duoserve.reattach import Reattacher
from duoserve.v1 import generation_pb2 as pb
from duoserve.v1 import generation_pb2_grpc as pb_grpc

CHAT_MESSAGE_KEYS = ("role", "content")



@dataclass(frozen=True, slots=True)
class Usage:
    """What a request cost and how long it took, measured by the gateway."""

    prompt_tokens: int          # input tokens after tokenization and the chat template
    completion_tokens: int      # tokens generated
    queue_time_ms: float        # arrival at the gateway to the start of prefill
    ttft_ms: float              # arrival at the gateway to the first token sent
    e2e_ms: float               # arrival at the gateway to the last response sent
    cached_tokens: int = 0      # of prompt_tokens, found in the stack's prefix cache (not computed)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its position (from the
    model's raw output, before penalties, temperature, top_k and top_p)."""

    token_id: int                               # the generated token
    logprob: float                              # its log-probability (natural log)
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob) of the `logprobs` most likely, best first


@dataclass(frozen=True, slots=True)
class Chunk:
    """One step of a streamed request."""

    request_id: str                     # the client's id, or the one the gateway assigned
    text: str                           # text added since the previous chunk
    token_ids: tuple[int, ...]          # token ids generated since the previous chunk
    finish_reason: str | None = None    # "stop", "length", "cancelled" or "error" on the last chunk
    usage: Usage | None = None          # on the last chunk only
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when the request set `logprobs`


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole request's output: every chunk joined."""

    request_id: str                     # the client's id, or the one the gateway assigned
    text: str                           # the completion text (stop strings cut off)
    token_ids: tuple[int, ...]          # every generated token id, in order
    finish_reason: str                  # "stop", "length", "cancelled" or "error"
    usage: Usage                        # token counts and latencies (zeros if the server sent none)
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when the request set `logprobs`


# ---------------------------------------------------------------------------------------------
# Conversions between keyword arguments / dataclasses and protobuf messages (pure, no I/O)
# ---------------------------------------------------------------------------------------------

def build_generate_request(
    prompt: str | None = None,
    *,
    messages: Iterable[Mapping[str, str]] | None = None,
    token_ids: Iterable[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    stop_token_ids: Iterable[int] | None = None,
    ignore_eos: bool = False,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_tokens: int | None = None,
    logprobs: int | None = None,
    request_id: str | None = None,
    priority: int | None = None,
    slo_class: str | None = None,
) -> pb.GenerateRequest:
    """The GenerateRequest for `generate`'s keyword arguments; None (or False) leaves a field unset.

    Checks only what the SDK can know (one input, types, message keys), raising InvalidArgument
    naming the argument; ranges are the server's to check, so that one place decides them.
    """
    inputs = [name for name, value in (("prompt", prompt), ("messages", messages),
                                       ("token_ids", token_ids)) if value is not None]
    if len(inputs) != 1:
        raise errors.InvalidArgument(
            "give exactly one of prompt, messages or token_ids"
            + (f" (got {', '.join(inputs)})" if inputs else ""))
    request = pb.GenerateRequest()
    if prompt is not None:
        _assign(request, "prompt", prompt)
    elif messages is not None:
        request.messages.SetInParent()          # selects the oneof case even for an empty list
        for i, message in enumerate(_items("messages", messages)):
            request.messages.messages.append(_chat_message(i, message))
    else:
        request.token_ids.SetInParent()
        _extend(request.token_ids.ids, "token_ids", _items("token_ids", token_ids))

    sampling = pb.SamplingParams()
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
                        ("repetition_penalty", repetition_penalty), ("min_tokens", min_tokens),
                        ("logprobs", logprobs)):
        if value is not None:
            _assign(sampling, name, value)
    if stop is not None:
        _extend(sampling.stop, "stop", [stop] if isinstance(stop, str) else _items("stop", stop))
    if stop_token_ids is not None:
        _extend(sampling.stop_token_ids, "stop_token_ids", _items("stop_token_ids", stop_token_ids))
    if ignore_eos:
        _assign(sampling, "ignore_eos", ignore_eos)
    if sampling.ListFields():                   # all unset: `sampling` itself stays unset
        request.sampling.CopyFrom(sampling)

    for name, value in (("request_id", request_id), ("priority", priority), ("slo_class", slo_class)):
        if value is not None:
            _assign(request, name, value)
    return request


def _assign(message: Any, field: str, value: Any) -> None:
    try:
        setattr(message, field, value)
    except (TypeError, ValueError) as e:
        raise errors.InvalidArgument(f"{field}: {e}") from e


def _extend(repeated: Any, field: str, values: list[Any]) -> None:
    try:
        repeated.extend(values)
    except (TypeError, ValueError) as e:
        raise errors.InvalidArgument(f"{field}: {e}") from e


def _items(field: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise errors.InvalidArgument(f"{field}: expected a list, got {type(value).__name__}")
    return list(value)


def _chat_message(index: int, message: Any) -> pb.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise errors.InvalidArgument(f"{where}: expected a dict, got {type(message).__name__}")
    unknown = sorted(set(message) - set(CHAT_MESSAGE_KEYS))
    if unknown:
        raise errors.InvalidArgument(
            f"{where}: unsupported keys {', '.join(map(repr, unknown))}; supported: "
            f"{', '.join(CHAT_MESSAGE_KEYS)}")
    for key in CHAT_MESSAGE_KEYS:
        if not isinstance(message.get(key), str):
            raise errors.InvalidArgument(f"{where}.{key}: expected a string")
    return pb.ChatMessage(role=message["role"], content=message["content"])


def enum_label(enum: EnumDescriptor, number: int) -> str:
    """The lower-case short name of an enum value: FINISH_REASON_STOP -> "stop".

    A value this SDK's stubs do not know (a newer server) reads "unknown".
    """
    value = enum.values_by_number.get(number)
    if value is None:
        return "unknown"
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"   # FinishReason -> FINISH_REASON_
    return value.name.removeprefix(prefix).lower()


def to_usage(usage: pb.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 queue_time_ms=usage.queue_time_ms, ttft_ms=usage.ttft_ms, e2e_ms=usage.e2e_ms,
                 cached_tokens=usage.cached_prompt_tokens)


def to_chunk(response: pb.GenerateResponse) -> Chunk:
    finished = response.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return Chunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=tuple(response.token_ids),
        finish_reason=enum_label(pb.FinishReason.DESCRIPTOR, response.finish_reason) if finished else None,
        usage=to_usage(response.usage) if response.HasField("usage") else None,
        logprobs=tuple(TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                       for lp in response.logprobs),
    )


def model_info_to_dict(info: pb.ModelInfo) -> dict[str, Any]:
    """Every ModelInfo field by name, set or not; enums as short names ("split")."""
    out: dict[str, Any] = {}
    for field in info.DESCRIPTOR.fields:
        value = getattr(info, field.name)
        if field.enum_type is not None:
            value = enum_label(field.enum_type, value)
        out[field.name] = value
    return out


class _Joiner:
    """Joins a stream's chunks into a Completion."""

    def __init__(self) -> None:
        self.request_id = ""
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self.request_id = chunk.request_id or self.request_id
        self.texts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.last = chunk

    def completion(self) -> Completion:
        last = self.last
        if last is None or last.finish_reason is None:
            raise errors.Internal("the server ended the stream without a finish reason")
        return Completion(request_id=self.request_id, text="".join(self.texts),
                          token_ids=tuple(self.token_ids), finish_reason=last.finish_reason,
                          usage=last.usage or Usage(0, 0, 0.0, 0.0, 0.0), logprobs=tuple(self.logprobs))


def _reattacher(stub: pb_grpc.GenerationStub, window_s: float, timeout: float | None) -> Reattacher:
    """The request's id is learnt from the gateway (it accepted the request), never from the request sent."""
    return Reattacher(lambda attach, left: stub.Attach(attach, timeout=left), window_s,
                      None if timeout is None else time.monotonic() + timeout)
