"""Prompts to token ids: the cheap bounds first, the tokenizer off the event loop.

One event loop serves every client stream of the gateway, so a prompt's tokenization must not run
on it: a 1 MB prompt takes about a second to tokenize, and while it did, every other stream stalled.
A prompt's way to token ids here:
  bounded    its size checked in O(1) against what could fit at all: characters (the gateway's
             max_prompt_chars; and for a request, the context times the longest token's characters,
             since a longer text has more tokens than the context whatever it says), the number of
             messages, the number of token ids
  waiting    for one of the encoder's threads (the gateway's `tokenizer_threads`); with more than
             `max_tokenize_waiting` prompts already waiting it is refused (QueueFull)
  prefixed   a request's text longer than PREFIX_CHARS_PER_TOKEN characters per context token: its
             first that many characters are tokenized first, and if they alone are more tokens than
             the context holds, it is refused without tokenizing the rest
  encoded    in the thread: HF's fast tokenizer releases the GIL while it encodes, so the loop goes on
             streaming (measured in docs/performance.md, "A flood of large prompts")
Chat messages are rendered with the template in the same thread (jinja holds the GIL, but only for the
string building, a few ms for the largest allowed conversation).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from services.engine.tokenizer import CHAT_ROLES, Tokenizer
from services.gateway.errors import InvalidInput, QueueFull

PREFIX_CHARS_PER_TOKEN = 8      # above ~2x English's characters per token: a prompt this long is rare
PREFIX_SLACK = 1.25             # a prefix's tokens exceed the whole text's only by the few at its cut;
                                # this much more than the context is refused without doubt


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """What bounds a prompt before any tokenizing."""

    max_chars: int                  # text characters at most (the gateway's max_prompt_chars)
    max_messages: int               # chat messages at most
    max_model_len: int              # the model's context in tokens
    vocab_size: int                 # token ids lie in [0, vocab_size)
    longest_token_chars: int        # characters of the vocabulary's longest token

    def __post_init__(self) -> None:
        if min(self.max_chars, self.max_messages, self.max_model_len, self.longest_token_chars) < 1:
            raise ValueError(f"every prompt limit must be at least 1: {self}")

    @property
    def context_chars(self) -> int:
        """A text longer than this cannot fit the context: each token covers at most the longest's characters."""
        return self.max_model_len * self.longest_token_chars

    @property
    def prefix_chars(self) -> int:
        return self.max_model_len * PREFIX_CHARS_PER_TOKEN


def check_text(text: str, field: str, limits: PromptLimits, for_context: bool) -> None:
    """InvalidInput naming `field` when the text is too long to tokenize (or, for a request, to fit)."""
    if len(text) > limits.max_chars:
        raise InvalidInput(f"{field}: {len(text)} characters; at most {limits.max_chars}")
    if for_context and len(text) > limits.context_chars:
        raise InvalidInput(f"{field}: {len(text)} characters cannot fit the model's {limits.max_model_len}-token "
                           f"context (a token covers at most {limits.longest_token_chars} characters)")


def check_messages(messages: Sequence[tuple[str, str]], limits: PromptLimits) -> None:
    if not messages:
        raise InvalidInput("messages: at least one message is required")
    if len(messages) > limits.max_messages:
        raise InvalidInput(f"messages: {len(messages)} messages; at most {limits.max_messages}")
    bad = next((i for i, (role, _) in enumerate(messages) if role not in CHAT_ROLES), None)
    if bad is not None:
        raise InvalidInput(f"messages[{bad}].role: must be one of {', '.join(CHAT_ROLES)}, "
                           f"got {messages[bad][0][:32]!r}")
    total = sum(len(content) for _, content in messages)
    if total > min(limits.max_chars, limits.context_chars):
        raise InvalidInput(f"messages: {total} characters in all; at most "
                           f"{min(limits.max_chars, limits.context_chars)} fit the model's "
                           f"{limits.max_model_len}-token context")


def check_token_ids(ids: Sequence[int], limits: PromptLimits) -> None:
    if not ids:
        raise InvalidInput("token_ids: empty; give at least one token id")
    if len(ids) >= limits.max_model_len:
        raise InvalidInput(f"token_ids: {len(ids)} tokens; the model's context is {limits.max_model_len} tokens")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidInput(f"token_ids: {bad} is outside the vocabulary [0, {limits.vocab_size})")


class PromptEncoder:
    """Tokenizes prompts in a few threads of its own; every call bounded before it queues."""

    def __init__(self, tokenizer: Tokenizer, limits: PromptLimits, threads: int = 1, max_waiting: int = 64) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
        self._waiting = 0               # calls queued or running in the pool (only the loop changes it)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def prompt_ids(self, prompt: str | None, messages: Sequence[tuple[str, str]] | None,
                         token_ids: Sequence[int] | None) -> list[int]:
        """A request's prompt tokens, from whichever input was given."""
        if token_ids is not None:
            check_token_ids(token_ids, self.limits)
            return list(token_ids)
        if messages is not None:
            check_messages(messages, self.limits)
            ids = await self._in_pool(self._chat, tuple(messages))
        elif prompt is not None and prompt.strip():
            check_text(prompt, "prompt", self.limits, for_context=True)
            ids = await self._in_pool(self._encode_request, prompt, "prompt")
        else:
            raise InvalidInput("prompt: empty; give a prompt, messages or token_ids")
        if not ids:
            raise InvalidInput("prompt: tokenizes to no tokens")
        return ids

    async def tokenize(self, text: str, field: str = "text", add_special_tokens: bool = True) -> list[int]:
        """Any text up to max_prompt_chars (no context bound: Tokenize is how a client learns the count)."""
        check_text(text, field, self.limits, for_context=False)
        return await self._in_pool(self.tokenizer.encode, text, add_special_tokens)

    async def _in_pool(self, fn, *args):        # noqa: ANN001, ANN202 - any of the methods above
        if self._waiting >= self.max_waiting:
            raise QueueFull(f"the gateway's tokenizer has {self._waiting} prompts waiting (limit "
                            f"{self.max_waiting}); retry with backoff")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    # ------------------------------------------------------------------ in the pool's threads
    def _encode_request(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        limits = self.limits
        if len(text) > limits.prefix_chars:
            head = len(self.tokenizer.encode(text[:limits.prefix_chars], add_special_tokens))
            if head > limits.max_model_len * PREFIX_SLACK:
                raise InvalidInput(f"{field}: more than {limits.max_model_len} tokens (its first "
                                   f"{limits.prefix_chars} characters alone are {head}); the model's context is "
                                   f"{limits.max_model_len} tokens")
        return self.tokenizer.encode(text, add_special_tokens)

    def _chat(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        try:
            text = self.tokenizer.chat_text([{"role": r, "content": c} for r, c in messages])
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        # The template already wrote any bos/special tokens as text (as Tokenizer.apply_chat_template).
        return self._encode_request(text, "messages", add_special_tokens=False)
