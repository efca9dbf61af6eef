"""One request's state inside an engine: its tokens, how many have KV in the cache, its blocks.

Pure Python. Prefill and decode are the same operation here: feed the tokens from
`num_computed_tokens` on, write their K/V, and sample the next token once every known token is
in the cache. A decode step is a chunk of one token.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.common.contracts import TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # queued; no KV (or preempted: KV dropped, will be recomputed)
    RUNNING = "running"        # owns blocks; prefilling in chunks or decoding
    HANDED_OFF = "handed_off"  # prefill done in a prefill-only engine; blocks now belong to decode
    FINISHED = "finished"      # stopped; blocks freed


class FinishReason(enum.Enum):
    STOP = "stop"              # EOS, a stop token id or a stop string
    LENGTH = "length"          # max_tokens or the model's context
    CANCELLED = "cancelled"    # the client went away or asked to stop
    ERROR = "error"            # the engine could not serve it


@dataclass(slots=True)
class Sequence:
    """A request as the scheduler tracks it."""

    request_id: str                              # unique within the engine
    prompt_token_ids: list[int]                  # the prompt, already tokenized
    params: SamplingParams
    arrival_time: float = 0.0                    # seconds (monotonic clock of the caller); FCFS order
    output_token_ids: list[int] = field(default_factory=list)  # generated so far
    num_computed_tokens: int = 0                 # leading tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)         # its KV blocks, in token order
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0                     # times its KV was dropped for recompute
    # With params.logprobs set: the logprob of each token this engine sampled for it, in order (the
    # sampler appends before postprocess appends the token); [-1] is the newest token's. A hand-off or
    # re-queue carries none: each engine delivers the logprobs of the tokens it sampled itself.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Prefix caching: the keys of its leading full blocks that are keyed in the allocator (by this
    # engine: found at admission, or computed here), and the prompt tokens its first admission found
    # cached (reported in its usage).
    block_keys: list[str] = field(default_factory=list)
    num_cached_tokens: int = 0
    # The reusable keys it looks up at admission (prefix_hash.reusable_keys), with the token count
    # they were made for: made once while it waits, not at every iteration that looks at it.
    lookup_keys: tuple[int, list[str]] = field(default_factory=lambda: (-1, []))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed before the next sample (1 for a decoding request)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token is missing from the cache (prompt, or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1 or not self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
