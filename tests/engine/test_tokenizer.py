"""Tokenizer: chat template, role checks, and streaming detokenization that never splits a character."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 😀👍🏽🎉 and a family 👨‍👩‍👧‍👦 done.",
    "日本語のテキストと中文文本，还有한국어.",
    "Accents: café, naïve, Ünïcödé, façade, Ærøskøbing.",
    "  leading spaces\nnew lines\n\ttabs 🙂 mixed 世界 ça va?",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


def stream(tokenizer: Tokenizer, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detok = tokenizer.detokenizer(prompt_ids)
    deltas = [detok.push(i) for i in ids]
    assert detok.token_ids == ids
    assert detok.text == "".join(deltas)
    return deltas


def test_basic_properties(tokenizer: Tokenizer) -> None:
    assert tokenizer.eos_token_ids == (2,)                 # <|im_end|>, as the GGUF says
    assert tokenizer.vocab_size == 49152
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(ids) == "Hello world"


def test_chat_template_is_applied(tokenizer: Tokenizer) -> None:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    tail = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[: 1] == [1]                                  # <|im_start|> opens the default system turn
    assert ids[-len(tail):] == tail                        # generation prompt
    assert "What is 2+2?" in tokenizer.decode(ids)
    assert ids.count(2) == 2                               # system and user turns each end with <|im_end|>
    messages = [{"role": "user", "content": "What is 2+2?"}]
    no_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == ids[: -len(tail)]


def test_unknown_role_is_named(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.role"):
        tokenizer.apply_chat_template(messages)


def test_missing_chat_template_is_an_error() -> None:
    class NoTemplate:
        chat_template = None
        eos_token_id = 0

    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(NoTemplate()).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(tokenizer: Tokenizer, text: str) -> None:
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say something."}])
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, prompt_ids, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1                                    # byte-level BPE splits this emoji
    deltas = stream(tokenizer, [], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🎉"


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Done.", add_special_tokens=False) + [2]
    deltas = stream(tokenizer, [1], ids)
    assert deltas[-1] == "" and "".join(deltas) == "Done."


def test_generation_config_adds_eos_ids(default_model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_model_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (2, 0)
