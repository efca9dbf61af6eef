"""A multi-turn chat workload for the simulator: each turn resends the conversation so far.

Pure Python. Conversations start as a Poisson process (`rate_per_s` at rate multiple 1, the gaps
divided by the multiple, as a trace's). A conversation is `turns` requests, closed loop as a chat
client: turn k+1 is sent a think time after turn k's last token (exponential, mean `think_s`, drawn
from the seed for each conversation and turn: the same in every system's run; a fixed think time
would keep conversations that start together in step, a burst again at every turn), and its prompt
is the system prompt
(`system_tokens`, the same for every conversation), every earlier user message and answer, and a
new user message of `user_tokens`; each answer is `answer_tokens` long (less only where the model's
context cuts it). So turn k's prompt is system + k (user + answer) + user tokens, and with prefix
caching all but its new message (and the last partial block) can be found cached, if its blocks
survived the think time in the pool.

A rate multiple scales conversation arrivals only: think time is a person's. Rates in requests per
second (`base_rate`) are conversations per second times turns: the request rate once the
conversations overlap.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Any

from orchestrator.sim_arrivals import INF, MarkedPrompt, SyntheticPrompt
from services.engine.sequence import Sequence as Seq


@dataclass(frozen=True, slots=True)
class ConversationWorkload:
    """The stated parameters of a multi-turn workload."""

    num_conversations: int
    turns: int                   # requests per conversation
    user_tokens: int             # tokens of each new user message
    answer_tokens: int           # output tokens of each turn
    think_s: float               # mean time from an answer's last token to the next turn's send
    rate_per_s: float            # conversations started per second at rate multiple 1 (Poisson)
    system_tokens: int = 0       # a system prompt every conversation starts with (shared by all)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.num_conversations, self.turns, self.user_tokens, self.answer_tokens) < 1:
            raise ValueError("num_conversations, turns, user_tokens and answer_tokens must be at least 1")
        if self.think_s < 0 or self.rate_per_s <= 0 or self.system_tokens < 0:
            raise ValueError("think_s and system_tokens must be >= 0, rate_per_s positive")

    @property
    def num_requests(self) -> int:
        return self.num_conversations * self.turns

    def prompt_tokens(self, turn: int) -> int:
        """Turn `turn`'s prompt (from 0) when every earlier answer had its full length."""
        return self.system_tokens + turn * (self.user_tokens + self.answer_tokens) + self.user_tokens

    def start_times_s(self) -> list[float]:
        """Each conversation's first send, seconds from the first one's (rate multiple 1)."""
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for _ in range(self.num_conversations):
            out.append(t)
            t += rng.expovariate(self.rate_per_s)
        return out

    def think_times_s(self) -> list[list[float]]:
        """Per conversation, the think time before each of its turns after the first."""
        rng = random.Random(f"think:{self.seed}")
        return [[rng.expovariate(1 / self.think_s) if self.think_s > 0 else 0.0 for _ in range(self.turns - 1)]
                for _ in range(self.num_conversations)]

    def base_rate(self) -> float:
        """Requests per second at rate multiple 1."""
        return self.rate_per_s * self.turns

    def describe(self) -> dict[str, Any]:
        prompts = [self.prompt_tokens(k) for k in range(self.turns)]
        return {"workload": "multi-turn", "conversations": self.num_conversations, "turns": self.turns,
                "user_tokens": self.user_tokens, "answer_tokens": self.answer_tokens, "think_s": self.think_s,
                "system_tokens": self.system_tokens, "conversation_rate_per_s": self.rate_per_s,
                "seed": self.seed, "requests": self.num_requests, "rate_per_s": round(self.base_rate(), 4),
                "mean_prompt_tokens": round(sum(prompts) / self.turns, 1),
                "mean_output_tokens": float(self.answer_tokens),
                "repeated_prompt_share": round(1 - self.turns * self.user_tokens / sum(prompts), 4)}


class ConversationArrivals:
    """The workload's turns as the simulation sends them (`sim_arrivals.Arrivals`). Request indices
    are given in send order, so `arrivals` grows in time order as a trace's does."""

    def __init__(self, workload: ConversationWorkload, rate_multiple: float, ingress_ms: float,
                 distinct: bool) -> None:
        if rate_multiple <= 0:
            raise ValueError("rate multiple must be positive")
        self.workload, self._ingress, self._distinct = workload, ingress_ms, distinct
        self.num_requests = workload.num_requests
        self.arrivals: list[float] = [INF] * self.num_requests
        self._turn_of: list[tuple[int, int]] = []          # by index: (conversation, turn)
        self._think_ms = [[s * 1000.0 for s in row] for row in workload.think_times_s()]
        scale = 1000.0 / rate_multiple
        # (queue time, send time, conversation, turn, prompt tokens): one per conversation at most, so
        # the conversation breaks every tie.
        self._heap = [(s * scale + ingress_ms, s * scale, c, 0, workload.prompt_tokens(0))
                      for c, s in enumerate(workload.start_times_s())]
        heapq.heapify(self._heap)
        self._peek()

    def _peek(self) -> None:
        self.next_ms = self._heap[0][0] if self._heap else INF

    def pop(self) -> tuple[int, bytes, int]:
        _, sent, conv, turn, length = heapq.heappop(self._heap)
        self._peek()
        index = len(self._turn_of)
        self._turn_of.append((conv, turn))
        self.arrivals[index] = sent
        w = self.workload
        prompt = MarkedPrompt.make(length, conv + 1, w.system_tokens) if self._distinct else SyntheticPrompt(length)
        return index, prompt, w.answer_tokens

    def turn_of(self, index: int) -> tuple[int, int]:
        """(conversation, turn) of the request sent `index`-th."""
        return self._turn_of[index]

    def finished(self, index: int, t_ms: float, seq: Seq) -> None:
        """Its answer is complete: the conversation's next turn, a think time later, resends it all."""
        conv, turn = self._turn_of[index]
        if turn + 1 < self.workload.turns:
            sent = t_ms + self._think_ms[conv][turn]
            heapq.heappush(self._heap, (sent + self._ingress, sent, conv, turn + 1,
                                        seq.num_tokens + self.workload.user_tokens))
            self._peek()

    def dropped(self, index: int) -> int:
        """A refused turn ends its conversation: its later turns are never sent."""
        return self.workload.turns - 1 - self._turn_of[index][1]


def max_prompt_tokens(workload: ConversationWorkload) -> int:
    """The last turn's prompt and answer: what the context must hold for no turn to be cut."""
    return workload.prompt_tokens(workload.turns - 1) + workload.answer_tokens

