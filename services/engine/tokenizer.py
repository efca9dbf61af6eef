"""Text <-> token ids for one checkpoint, and streaming detokenization.

A wrapper over `transformers.AutoTokenizer` with the few operations the engine needs. Streaming follows
vLLM/TGI: each new token is decoded together with a short window of the tokens before it and only the
difference is emitted, so byte-level BPE pieces of one UTF-8 character are held back until it is whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from services.engine.model_config import generation_eos_ids

CHAT_ROLES = ("system", "user", "assistant", "tool")
_PREFIX_WINDOW = 5          # prompt tokens decoded before the first output token, for spacing context
_REPLACEMENT = "\ufffd"     # what a partial UTF-8 sequence decodes to


class Tokenizer:
    """One checkpoint's tokenizer: encode, chat template, decode, streaming decode."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self._hf = hf_tokenizer
        ids = [hf_tokenizer.eos_token_id, *eos_token_ids]
        # Ordered and unique, the tokenizer's own eos first: any of them ends a request.
        self._eos = tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer files of an HF checkpoint directory (plus eos ids from generation_config.json)."""
        from transformers import AutoTokenizer  # slow to import; keep it out of module import

        path = Path(path)
        return cls(AutoTokenizer.from_pretrained(str(path)), generation_eos_ids(path))

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added ones included; the embedding may have more (padded) rows."""
        return len(self._hf)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def longest_token_chars(self) -> int:
        """An upper bound on the characters one token stands for: the longest vocabulary entry, whose
        byte-level (or sentencepiece) spelling has at least as many characters as its text."""
        return max(len(piece) for piece in self._hf.get_vocab())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the checkpoint's chat template."""
        # The template already wrote any bos/special tokens as text; adding them again would double them.
        return self.encode(self.chat_text(messages, add_generation_prompt), add_special_tokens=False)

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`messages` rendered with the checkpoint's chat template, as text (ValueError: bad messages)."""
        if not self._hf.chat_template:
            raise ValueError("this checkpoint has no chat template; send a plain prompt instead")
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        return self._hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self, prompt_ids: Sequence[int]) -> "IncrementalDetokenizer":
        """A streaming decoder for the tokens generated after `prompt_ids`."""
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time, never splitting a character.

    Invariant: ids[prefix_offset:read_offset] decodes to text already emitted (it gives context such as
    a leading space); ids[read_offset:] are tokens whose text is not emitted yet.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-_PREFIX_WINDOW:])
        self._num_context = len(self._ids)          # prompt tokens kept only as context
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text_parts: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The generated ids pushed so far (no prompt ids)."""
        return self._ids[self._num_context:]

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._text_parts)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text it completes (possibly empty)."""
        self._ids.append(int(token_id))
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""       # a special token, or a character still missing bytes: wait for more
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text_parts.append(delta)
        return delta
