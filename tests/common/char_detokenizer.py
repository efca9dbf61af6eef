"""A detokenizer for gateway tests without a model: token id = Unicode code point, one character each."""
from __future__ import annotations


class CharDetokenizer:
    def __init__(self) -> None:
        self.text = ""

    def push(self, token_id: int) -> str:
        self.text += chr(token_id)
        return chr(token_id)
