"""Multi-turn conversations for `duoserve bench serve` / `compare` / `peer` (`--dataset multi-turn`).

A conversation's life here:
  made        synthetic, with stated parameters (MultiTurnParams): one system prompt shared by every
              conversation, then `turns` user messages, each with the length of its answer
  given ids   the system prompt and the user messages become windows of real English tokenized by
              the served model (`conversations_with_token_ids`): the system prompt one window for
              all, each user message its own
  one run's   the first token of every conversation names the run (`conversations_for_run`, as
              datasets.for_run): shared within a run and a conversation, never across runs
  sent        by bench.multiturn: turn k's prompt is the system prompt, every earlier user message
              and answer, then user message k (`turn_prompt`); sent only after turn k-1's answer
              arrived, `think_s` later; conversations start at the Arrival's rate (conversations/s)

So every turn resends the whole history: what a chat client does, and what prefix caching reuses.
Pure: no I/O, no grpc, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from bench.datasets import RUN_TOKEN_BASE


@dataclass(frozen=True, slots=True)
class MultiTurnParams:
    """The synthetic multi-turn workload's parameters (all lengths in tokens of the served model)."""

    num_conversations: int = 50     # conversations in a run
    turns: int = 4                  # user messages (requests) per conversation
    user_len: int = 64              # tokens per user message
    answer_len: int = 32            # tokens per answer (forced: ignore_eos)
    system_len: int = 256           # the system prompt, the same for every conversation of a run (0: none)
    think_s: float = 1.0            # a user's pause between an answer's last token and the next message
    range_ratio: float = 0.0        # user and answer lengths uniform in len * (1 -/+ r), as `random`
    seed: int = 0                   # the lengths' random generator

    def __post_init__(self) -> None:
        if self.num_conversations < 1 or self.turns < 1:
            raise ValueError("a multi-turn workload needs at least one conversation of at least one turn")
        if self.user_len < 1 or self.answer_len < 1 or self.system_len < 0:
            raise ValueError("user and answer lengths must be at least 1, the system prompt's at least 0")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range ratio must be in [0, 1), got {self.range_ratio}")
        if self.think_s < 0:
            raise ValueError(f"think time must not be negative, got {self.think_s}")

    def describe(self) -> str:
        spread = f" (x 1 -/+ {self.range_ratio:g})" if self.range_ratio else ""
        return (f"multi-turn: {self.num_conversations} conversations x {self.turns} turns, system prompt "
                f"{self.system_len} tokens (shared), user messages {self.user_len}{spread}, answers "
                f"{self.answer_len}{spread}, think time {self.think_s:g} s")


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation: what its user says, and how long each answer is."""

    system_len: int                                  # tokens of the shared system prompt
    user_lens: tuple[int, ...]                       # per turn
    answer_lens: tuple[int, ...]                     # per turn: max_tokens, forced
    think_s: float                                   # pause before each turn after the first
    system_ids: tuple[int, ...] | None = None        # set by conversations_with_token_ids
    user_ids: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if not self.user_lens or len(self.user_lens) != len(self.answer_lens):
            raise ValueError("a conversation needs one answer length per user message, at least one")

    @property
    def turns(self) -> int:
        return len(self.user_lens)

    def max_context(self) -> int:
        """Tokens of its longest request: the last turn's prompt and answer (the whole conversation)."""
        return self.system_len + sum(self.user_lens) + sum(self.answer_lens)


def synthetic_conversations(params: MultiTurnParams) -> list[Conversation]:
    """`num_conversations` conversations of `turns` turns; lengths as vLLM's `random` dataset draws them."""
    rng = np.random.default_rng(params.seed)

    def lengths(mean: int) -> tuple[int, ...]:
        low, high = max(1, int(mean * (1 - params.range_ratio))), int(mean * (1 + params.range_ratio))
        return tuple(int(x) for x in rng.integers(low, high + 1, size=params.turns))

    return [Conversation(params.system_len, lengths(params.user_len), lengths(params.answer_len), params.think_s)
            for _ in range(params.num_conversations)]


def is_conversations(workload: Sequence[object]) -> bool:
    """A multi-turn workload (else a list of RequestSpecs)."""
    return bool(workload) and isinstance(workload[0], Conversation)


def _window(corpus_ids: Sequence[int], start: int, length: int) -> tuple[int, ...]:
    n = len(corpus_ids)
    return tuple(corpus_ids[(start + k) % n] for k in range(length))


def conversations_with_token_ids(convs: Sequence[Conversation], corpus_ids: Sequence[int]) -> list[Conversation]:
    """Token ids for conversations without them: the system prompt the corpus from its start (one for
    all), each user message a window starting elsewhere (a prime stride, as datasets.with_token_ids),
    so conversations share exactly their system prompt. The starts are distinct for up to
    len(corpus_ids) messages (REAL_TEXT is 299 tokens to SmolLM2); past that two first turns could
    only coincide every turns * len(corpus_ids) messages."""
    if not corpus_ids:
        raise ValueError("the corpus tokenized to no tokens")
    n, out, message = len(corpus_ids), [], 0
    for conv in convs:
        if conv.user_ids is not None:
            out.append(conv)
            continue
        users = []
        for length in conv.user_lens:
            message += 1
            users.append(_window(corpus_ids, (message * 7919) % n, length))
        out.append(replace(conv, system_ids=_window(corpus_ids, 0, conv.system_len), user_ids=tuple(users)))
    return out


def conversations_for_run(convs: Sequence[Conversation], run: int) -> list[Conversation]:
    """The conversations with their first token (the system prompt's, or the first user message's
    without one) set to run `run`'s (datasets.for_run): no run reuses another's cached KV; within a
    run the system prompt stays shared, and each conversation's turns share their history."""
    token = RUN_TOKEN_BASE + run
    out = []
    for conv in convs:
        if conv.user_ids is None:
            out.append(conv)
        elif conv.system_ids:
            out.append(replace(conv, system_ids=(token, *conv.system_ids[1:])))
        else:
            first = (token, *conv.user_ids[0][1:])
            out.append(replace(conv, user_ids=(first, *conv.user_ids[1:])))
    return out


def turn_prompt(history: Sequence[int], user_ids: Sequence[int]) -> tuple[int, ...]:
    """A turn's prompt: everything said so far (system prompt, user messages, answers), then the new message."""
    return (*history, *user_ids)


def describe_lengths(convs: Sequence[Conversation]) -> str:
    """Mean prompt and answer tokens per request over the whole workload (every turn resending its history)."""
    prompts, answers = [], []
    for conv in convs:
        history = conv.system_len
        for user, answer in zip(conv.user_lens, conv.answer_lens):
            prompts.append(history + user)
            answers.append(answer)
            history += user + answer
    return (f"{len(prompts)} requests, mean {sum(prompts) / len(prompts):.0f} in / "
            f"{sum(answers) / len(answers):.0f} out tokens, longest {max(c.max_context() for c in convs)}")
