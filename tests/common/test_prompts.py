"""The gateway's prompt encoder (services/gateway/prompts.py): bounds before any tokenizing, the
prefix check for texts too long for the context, a bounded wait, and the event loop free while a
prompt is tokenized. The real tokenizer of the default model; no stack."""
from __future__ import annotations

import asyncio
import random
import string
import time
from pathlib import Path

import pytest

from services.engine.tokenizer import Tokenizer
from services.gateway.errors import InvalidInput, QueueFull
from services.gateway.prompts import (PREFIX_CHARS_PER_TOKEN, PromptEncoder, PromptLimits, check_messages,
                                      check_text, check_token_ids)

CONTEXT = 2048


def make_limits(**overrides) -> PromptLimits:
    fields = dict(max_chars=1 << 20, max_messages=8, max_model_len=CONTEXT, vocab_size=1000, longest_token_chars=81)
    return PromptLimits(**{**fields, **overrides})


def words(num_chars: int, seed: int = 0) -> str:
    """Text of random short words: about 2 characters per token for SmolLM2's tokenizer."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < num_chars:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:num_chars]


def test_bounds_checked_before_any_tokenizing():
    limits = make_limits()
    with pytest.raises(InvalidInput, match=r"^prompt: 1048577 characters; at most 1048576"):
        check_text("x" * ((1 << 20) + 1), "prompt", limits, for_context=False)
    with pytest.raises(InvalidInput, match=r"^prompt: 165889 characters cannot fit the model's 2048-token context"):
        check_text("x" * (CONTEXT * 81 + 1), "prompt", limits, for_context=True)
    check_text("x" * (CONTEXT * 81 + 1), "text", limits, for_context=False)       # Tokenize has no context bound
    with pytest.raises(InvalidInput, match=r"^messages: at least one"):
        check_messages([], limits)
    with pytest.raises(InvalidInput, match=r"^messages: 9 messages; at most 8"):
        check_messages([("user", "x")] * 9, limits)
    with pytest.raises(InvalidInput, match=r"^messages\[1\]\.role: must be one of"):
        check_messages([("user", "x"), ("robot", "x")], limits)
    with pytest.raises(InvalidInput, match=r"^messages: 165889 characters in all"):
        check_messages([("user", "x" * CONTEXT * 81), ("user", "x")], limits)
    with pytest.raises(InvalidInput, match=r"^token_ids: 2048 tokens; the model's context is 2048"):
        check_token_ids([5] * CONTEXT, limits)
    with pytest.raises(InvalidInput, match=r"^token_ids: 1000 is outside"):
        check_token_ids([5, 1000], limits)
    with pytest.raises(InvalidInput, match=r"^token_ids: empty"):
        check_token_ids([], limits)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture
def encoder(tokenizer):
    limits = make_limits(vocab_size=tokenizer.vocab_size, longest_token_chars=tokenizer.longest_token_chars)
    encoder = PromptEncoder(tokenizer, limits, threads=1, max_waiting=4)
    yield encoder
    encoder.close()


def test_prompts_tokenize_as_the_tokenizer_does(encoder, tokenizer):
    async def scenario():
        text = words(3000)
        assert await encoder.prompt_ids(text, None, None) == tokenizer.encode(text)
        messages = (("system", "Be brief."), ("user", "Hi there"))
        assert await encoder.prompt_ids(None, messages, None) == tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages])
        assert await encoder.prompt_ids(None, None, (1, 2, 3)) == [1, 2, 3]
        assert await encoder.tokenize("ab", add_special_tokens=False) == tokenizer.encode("ab", False)
        with pytest.raises(InvalidInput, match="^prompt: empty"):
            await encoder.prompt_ids("   ", None, None)
    asyncio.run(scenario())


def test_a_text_too_long_for_the_context_is_refused_from_its_prefix(encoder, tokenizer):
    """~2 characters per token: 100k characters are ~50k tokens; only the first 16k characters are
    tokenized before the refusal. A text as long that fits (spaces: 64 per token) is tokenized whole."""
    assert tokenizer.longest_token_chars >= 64
    async def scenario():
        with pytest.raises(InvalidInput, match=rf"^prompt: more than {CONTEXT} tokens \(its first "
                                               rf"{CONTEXT * PREFIX_CHARS_PER_TOKEN} characters alone are"):
            await encoder.prompt_ids(words(100_000), None, None)
        spaces = "a" + " " * (CONTEXT * 40)
        assert len(await encoder.prompt_ids(spaces, None, None)) < CONTEXT
        with pytest.raises(InvalidInput, match=r"^messages: more than"):
            await encoder.prompt_ids(None, (("user", words(100_000)),), None)
    asyncio.run(scenario())


def test_the_event_loop_runs_while_a_prompt_is_tokenized(encoder):
    """HF's fast tokenizer releases the GIL: a ticker on the loop keeps ticking through a long encode."""
    text = words(1_000_000, seed=1)

    async def scenario() -> tuple[int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.002)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        await encoder.tokenize(text)
        elapsed = time.monotonic() - started
        task.cancel()
        return ticks, elapsed

    ticks, elapsed = asyncio.run(scenario())
    assert ticks >= 10, f"the loop ticked {ticks} times in {elapsed:.2f} s of tokenizing"


def test_too_many_waiting_is_queue_full(encoder):
    text = words(400_000, seed=2)

    async def scenario() -> list:
        calls = [encoder.tokenize(text) for _ in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, QueueFull)]
    assert len(refused) == 2 and all(isinstance(r, list) for r in results[:4])
    assert str(refused[0]).startswith("the gateway's tokenizer has 4 prompts waiting (limit 4)")
