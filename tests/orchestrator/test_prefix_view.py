"""Which waiting prompts the orchestrator looks up in the prefix cache, with which keys (pure: the
keys and the bounds; the lookups are in tests/common/test_orchestrator_prefix_view.py)."""
from __future__ import annotations

from orchestrator.prefix_view import CacheScope, PromptKeys
from services.engine.prefix_hash import reusable_keys

SCOPE = CacheScope(16, "memory-1")


def _prompts(lengths: dict[str, int], calls: list[str]):
    """(id, tokens function) per prompt; `calls` records which prompts were read."""
    def tokens(ident: str, n: int):
        def read():
            calls.append(ident)
            return list(range(n))
        return read
    return [(ident, tokens(ident, n)) for ident, n in lengths.items()]


def test_keys_are_the_workers_and_each_prompt_is_hashed_once():
    calls: list[str] = []
    view = PromptKeys()
    prompts = _prompts({"a": 100, "b": 64, "short": 10}, calls)
    first = view.examine(SCOPE, prompts)
    assert first == [("a", reusable_keys(list(range(100)), 16, "memory-1")),
                     ("b", reusable_keys(list(range(64)), 16, "memory-1"))]    # no full block: not looked up
    assert len(first[1][1]) == 3                                              # its last token is always computed
    assert view.examine(SCOPE, prompts) == first and calls == ["a", "b", "short"]   # remembered
    view.examine(SCOPE, prompts[1:])                                          # "a" left the queue: forgotten
    assert view.examine(SCOPE, prompts) == first and calls == ["a", "b", "short", "a"]
    other = view.examine(CacheScope(16, "memory-2"), prompts)                 # the arena came back on new memory
    assert other[0][1] == reusable_keys(list(range(100)), 16, "memory-2") != first[0][1]


def test_bounded_by_prompts_then_by_keys_oldest_first():
    calls: list[str] = []
    prompts = _prompts({f"r{i}": 160 for i in range(6)}, calls)               # 9 keys each
    assert [i for i, _ in PromptKeys(max_prompts=4).examine(SCOPE, prompts)] == ["r0", "r1", "r2", "r3"]
    assert calls == ["r0", "r1", "r2", "r3"]                                  # the rest are not even read
    assert [i for i, _ in PromptKeys(max_keys=20).examine(SCOPE, prompts)] == ["r0", "r1"]
    assert PromptKeys(max_prompts=0).examine(SCOPE, prompts) == []
