"""Stop strings and held-back text, on a character-level stand-in detokenizer (pure Python)."""
from __future__ import annotations

from services.engine.output import OutputState
from services.engine.sampling_params import SamplingParams


class CharDetokenizer:
    """Token id = a character's code point: enough to test text handling without a tokenizer."""

    def __init__(self) -> None:
        self.text = ""

    def push(self, token_id: int) -> str:
        self.text += chr(token_id)
        return chr(token_id)


def _run(text: str, stop: tuple[str, ...]) -> tuple[list[str], OutputState]:
    state = OutputState(SamplingParams(stop=stop), CharDetokenizer())
    deltas = []
    for ch in text:
        state.push(ord(ch), is_special_stop=False)
        deltas.append(state.take_text(is_finished=state.hit_stop_string))
        if state.hit_stop_string:
            break
    return deltas, state


def test_stop_string_is_cut_exactly_and_never_streamed():
    deltas, state = _run("Hello, world. Bye", stop=("world",))
    assert state.hit_stop_string
    assert "".join(deltas) == "Hello, "
    assert all("w" not in d for d in deltas)


def test_partial_match_is_held_back_then_released():
    deltas, state = _run("abcabd", stop=("abd!",))
    assert not state.hit_stop_string
    assert "".join(deltas) + state.take_text(is_finished=True) == "abcabd"
    assert "".join(deltas) == "abc"      # "abd" could still become the stop string


def test_earliest_of_several_stop_strings_wins():
    _, state = _run("one two three", stop=("three", "two"))
    assert state.final_text == "one "


def test_special_stop_token_adds_no_text():
    state = OutputState(SamplingParams(), CharDetokenizer())
    state.push(ord("a"), is_special_stop=False)
    state.push(0, is_special_stop=True)
    assert state.take_text(is_finished=True) == "a"


def test_stop_strings_count_only_after_min_tokens():
    # vLLM: no stop string ends a request before min_tokens tokens; a match must end after them.
    state = OutputState(SamplingParams(stop=("ab",), min_tokens=3), CharDetokenizer())
    for ch in "xab":                              # "ab" completed by the 3rd token: too early
        state.push(ord(ch), is_special_stop=False)
    assert not state.hit_stop_string
    state.push(ord("a"), is_special_stop=False)   # "xaba": the old match is not found again
    assert not state.hit_stop_string
    state.push(ord("b"), is_special_stop=False)   # "xabab": a new match, after min_tokens
    assert state.hit_stop_string
    assert state.take_text(is_finished=True) == "xab"
