"""Per-request output processing: incremental text, stop strings, and what a step reports.

No torch. Stop strings are matched on the detokenized text; the text returned never includes the
stop string, and while a request runs the last few characters are held back when they could be the
start of a stop string, so a streamed client never sees text that is later taken back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence as Seq

from services.engine.sampling_params import SamplingParams
from services.engine.sequence import FinishReason

if TYPE_CHECKING:
    from services.common.contracts import TokenLogprob


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...    # text delta for one more token

    @property
    def text(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step reports for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]      # tokens generated in this step
    new_text: str                       # text that became final in this step
    token_ids: tuple[int, ...]          # all completion tokens so far
    text: str                           # all final completion text so far
    num_prompt_tokens: int
    finish_reason: FinishReason | None  # set on the last output of a request
    new_logprobs: tuple[TokenLogprob, ...] = ()   # parallel to new_token_ids when params.logprobs is set
    logprobs: tuple[TokenLogprob, ...] = ()       # parallel to token_ids when params.logprobs is set

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


class OutputState:
    """Text and stop-string state of one running request."""

    def __init__(self, params: SamplingParams, detokenizer: Detokenizer) -> None:
        self.params = params
        self.detokenizer = detokenizer
        self.num_emitted_chars = 0          # text already handed out
        self.stop_at: int | None = None     # index in the text where a stop string begins
        self._hold_back = max((len(s) for s in params.stop), default=1) - 1
        self._num_pushed = 0                # tokens detokenized
        self._stop_floor = 0                # a stop string must end past this index (vLLM: none
                                            # counts before min_tokens tokens were generated)

    def push(self, token_id: int, is_special_stop: bool) -> None:
        """Add one generated token. EOS and stop token ids produce no text."""
        if is_special_stop or self.stop_at is not None:
            return
        self.detokenizer.push(token_id)
        self._num_pushed += 1
        if self._num_pushed <= self.params.min_tokens:
            self._stop_floor = len(self.detokenizer.text)
        elif self.params.stop:
            self.stop_at = self._find_stop(self.detokenizer.text)

    def _find_stop(self, text: str) -> int | None:
        # Only the tail can hold a new match: search from where an earlier match could not have ended.
        search_from = max(0, self.num_emitted_chars - self._hold_back - 1)
        hits = [i for s in self.params.stop
                if (i := text.find(s, max(search_from, self._stop_floor - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    @property
    def hit_stop_string(self) -> bool:
        return self.stop_at is not None

    def take_text(self, is_finished: bool) -> str:
        """The newly final text: everything up to a stop string, minus a hold-back while running."""
        text = self.detokenizer.text
        if self.stop_at is not None:
            end = self.stop_at
        elif is_finished:
            end = len(text)
        else:
            end = max(self.num_emitted_chars, len(text) - self._hold_back)
        delta = text[self.num_emitted_chars:end]
        self.num_emitted_chars = max(self.num_emitted_chars, end)
        return delta

    @property
    def final_text(self) -> str:
        return self.detokenizer.text[: self.num_emitted_chars]


def make_output(request_id: str, state: OutputState, new_token_ids: Seq[int], all_token_ids: Seq[int],
                num_prompt_tokens: int, finish_reason: FinishReason | None,
                all_logprobs: Seq[TokenLogprob] = ()) -> RequestOutput:
    new_text = state.take_text(finish_reason is not None)
    new_logprobs = tuple(all_logprobs[len(all_logprobs) - len(new_token_ids):]) if all_logprobs else ()
    return RequestOutput(request_id, tuple(new_token_ids), new_text, tuple(all_token_ids),
                         state.final_text, num_prompt_tokens, finish_reason, new_logprobs, tuple(all_logprobs))
