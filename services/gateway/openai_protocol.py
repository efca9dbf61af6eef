"""The OpenAI-compatible HTTP API's request models and their conversion to the frontend's types.

Requests accept what vLLM's OpenAI server accepts (unknown fields are ignored, as there); the
conversion fills the defaults and raises `InvalidInput` naming the field, like the gRPC servicer.
Responses are plain dicts built in `services.gateway.openai_http` (their shape is OpenAI's).
"""
from __future__ import annotations

import logging
import re

from pydantic import BaseModel, ConfigDict, Field

from services.engine.sampling_params import InvalidSamplingParams, SamplingParams
from services.gateway.errors import GatewayError, InvalidInput, ModelNotFound, NotReady, QueueFull

log = logging.getLogger("duoserve.gateway")

MAX_N = 16                     # choices per prompt
MAX_PROMPTS = 64               # prompts per completions request (each runs n times)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False            # a last chunk with no choices and the request's usage
    continuous_usage_stats: bool = False   # accepted; usage comes only at the end


class _Sampling(_Request):
    """The fields both APIs share, as vLLM names them. None: the server's default."""

    model: str | None = None               # checked against the served model; unset: the served one
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None       # unset: 1.0, as the gRPC API
    top_p: float | None = None
    top_k: int | None = None               # -1 or 0 disables (vLLM accepts both)
    seed: int | None = None                # choice i of n uses seed + i
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    user: str | None = None                # accepted, not used
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidInput("stream_options: only allowed with stream=true")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16            # OpenAI's and vLLM's default here; null fills the context
    logprobs: int | None = None            # the sampled token's logprob and this many alternatives
    echo: bool = False                     # the prompt's text before the completion
    suffix: str | None = None              # not supported (as vLLM)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or any(isinstance(x, list) and not x for x in out):
            raise InvalidInput("prompt: empty; give a string, a list of strings or token ids")
        if len(out) * self.n > MAX_PROMPTS:
            raise InvalidInput(f"prompt: at most {MAX_PROMPTS} prompts times n per request")
        return out

    def check(self) -> None:
        self.check_stream_options()
        if self.suffix is not None:
            raise InvalidInput("suffix: not supported")
        if self.echo and self.logprobs is not None:
            raise InvalidInput("echo: not supported together with logprobs (no prompt logprobs)")


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" or part.text is None for part in self.content):
            raise InvalidInput(f"messages: message {index} has a part that is not text; only text is supported")
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None          # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False                 # each token's logprob ...
    top_logprobs: int | None = None        # ... and this many alternatives (needs logprobs)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((m.role, m.text(i)) for i, m in enumerate(self.messages))

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("top_logprobs: needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        self.check_stream_options()


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True        # prompt only
    add_generation_prompt: bool = True     # messages only


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


def fill_max_tokens(requested: int | None, num_prompt: int, max_model_len: int, limit: int) -> int:
    """Unset: the rest of the context, as vLLM, bounded by the gateway's limit. A value too large is
    kept so that the frontend's check refuses it with the field named."""
    if requested is not None:
        return requested
    return max(1, min(max_model_len - num_prompt, limit))


def to_sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """One choice's parameters; the fields vLLM has and the gRPC API lacks are passed only when set."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    optional = {"presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                "repetition_penalty": req.repetition_penalty, "min_tokens": req.min_tokens, "logprobs": logprobs}
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            seed=None if req.seed is None else req.seed + choice,
            stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            **{k: v for k, v in optional.items() if v is not None})
    except InvalidSamplingParams as e:
        raise InvalidInput(str(e)) from None



# ------------------------------------------------------------------ errors, in vLLM's shape
ERROR_KINDS: dict[type, tuple[int, str]] = {      # exception -> (HTTP status, type), as vLLM names them
    InvalidInput: (400, "BadRequestError"), ModelNotFound: (404, "NotFoundError"),
    QueueFull: (429, "RateLimitError"), NotReady: (503, "ServiceUnavailableError")}
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_.\[\]]*): ")      # "top_k: ...", "messages[1].role: ..."


def error_body(status: int, kind: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_of(exc: BaseException) -> tuple[int, dict]:
    """The status and body of a gateway error; anything else is a 500 (logged, no trace to the client)."""
    for cls, (status, kind) in ERROR_KINDS.items():
        if isinstance(exc, cls):
            message = str(exc)
            field = _FIELD.match(message)
            param = "model" if isinstance(exc, ModelNotFound) else field.group(1) if field else None
            return status, error_body(status, kind, message, param)
    if not isinstance(exc, GatewayError):
        log.error("internal error in the HTTP API", exc_info=exc)
    return 500, error_body(500, "InternalServerError", f"internal error: {type(exc).__name__}; see the gateway log")
