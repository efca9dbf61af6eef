"""Sampling parameters of one request: the contract between every API surface and the engine.

Pure Python: validated once here so that the gateway, the offline CLI and the engine agree on
what a valid request is, and every error names the field at fault.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_STOP_STRINGS = 16          # vLLM/OpenAI accept a handful; more is almost always a client bug
MAX_STOP_STRING_CHARS = 256    # a stop string longer than this is not a stop string
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20              # alternatives per token at most, as vLLM's default max_logprobs
MAX_PENALTY = 2.0              # presence/frequency penalties lie in [-2, 2] (OpenAI, vLLM)


class InvalidSamplingParams(ValueError):
    """A sampling field is out of range; `field` names it for the API error message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop."""

    max_tokens: int = 16                 # completion tokens at most (>= 1)
    temperature: float = 1.0             # 0 means greedy
    top_p: float = 1.0                   # nucleus mass in (0, 1]; 1 disables
    top_k: int = 0                       # keep the k most likely tokens; 0 disables
    seed: int | None = None              # per-request seed: same seed, same tokens
    stop: tuple[str, ...] = ()           # stop strings; the output is cut before the first match
    stop_token_ids: tuple[int, ...] = () # extra token ids that end the request (kept out of text)
    ignore_eos: bool = False             # keep going past the model's end-of-sequence token
    presence_penalty: float = 0.0        # subtracted once from each token already generated; [-2, 2]
    frequency_penalty: float = 0.0       # subtracted per occurrence in the generated tokens; [-2, 2]
    repetition_penalty: float = 1.0      # > 0; tokens of prompt or output: positive logits / it, others * it
    min_tokens: int = 0                  # EOS and stop_token_ids cannot be sampled before this many tokens
    logprobs: int | None = None          # None: none; k: each token's logprob and the k most likely (k <= 20)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidSamplingParams("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidSamplingParams("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParams("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSamplingParams("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidSamplingParams("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for text in self.stop:
            if not text or len(text) > MAX_STOP_STRING_CHARS:
                raise InvalidSamplingParams(
                    "stop", f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSamplingParams(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:      # also rejects NaN
                raise InvalidSamplingParams(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise InvalidSamplingParams(
                "repetition_penalty", f"must be > 0 (1 disables), got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidSamplingParams(
                "min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidSamplingParams(
                "logprobs", f"must be in [0, {MAX_LOGPROBS}] (or unset for none), got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Some penalty changes the logits (the sampler then needs the request's tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
