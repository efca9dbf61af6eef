"""How much of each waiting prompt the prefix cache already holds, as the orchestrator sees it.

Pure Python: the keys and the bounds. The live orchestrator (`orchestrator.redis_state`) looks the
keys up in Redis's cache index, one pipelined HMGET per prompt in one round trip per tick; the
simulator looks them up in its `BlockManager`. Either way a prompt's cached tokens are the leading
run of its full blocks found (`prefix_hash.reusable_keys`: at least its last token is computed),
times the block size: what an admission now would reuse, so the policy's replay prefills only
the rest and its token budget counts only the work that will run.

It is a hint, as the free count is: a block may be keyed (another request's prefill ends) or
evicted (the pool runs short) before the request is admitted. Bounded per tick: the oldest
`max_prompts` prompts (the replay prefills them first; the rest count every token, as without
caching) and `max_keys` keys in all. A prompt is hashed once (SHA-256 per block), then remembered
by its id until it leaves the queue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

from services.engine.prefix_hash import reusable_keys

MAX_PROMPTS = 64           # prompts looked up per tick, oldest first
MAX_KEYS = 16384           # block keys looked up per tick (256k prompt tokens at 16 tokens a block)


@dataclass(frozen=True, slots=True)
class CacheScope:
    """What a block key depends on besides the tokens: the pool's block size and the workers' salt
    (`WorkerReport.cache_salt`: the KV memory's identity)."""

    block_size: int
    salt: str


class PromptKeys:
    """Each waiting prompt's reusable block keys, made once per prompt and scope."""

    def __init__(self, max_prompts: int = MAX_PROMPTS, max_keys: int = MAX_KEYS) -> None:
        if max_prompts < 0 or max_keys < 0:
            raise ValueError("max_prompts and max_keys must be >= 0")
        self.max_prompts, self.max_keys = max_prompts, max_keys
        self._scope: CacheScope | None = None
        self._keys: dict[Hashable, list[str]] = {}

    def examine(self, scope: CacheScope, prompts: Iterable[tuple[Hashable, Callable[[], Sequence[int]]]]
                ) -> list[tuple[Hashable, list[str]]]:
        """(id, keys) of the prompts to look up this tick, in the order given (oldest first), within the
        bounds. `prompts`: (id, a function that returns its tokens); an id names one prompt's tokens for
        good (a stream entry's id; in the simulator a request and its length), so they are asked for
        only the first time it is seen. Ids not given are forgotten."""
        if scope != self._scope:              # another pool or arena memory: no old key matches
            self._scope, self._keys = scope, {}
        known, self._keys = self._keys, {}
        out: list[tuple[Hashable, list[str]]] = []
        budget = self.max_keys
        for ident, tokens in prompts:
            if len(out) >= self.max_prompts:
                break
            keys = known.get(ident)
            if keys is None:
                keys = reusable_keys(tokens(), scope.block_size, scope.salt)
            self._keys[ident] = keys
            if not keys:
                continue
            if len(keys) > budget:
                break
            budget -= len(keys)
            out.append((ident, keys))
        return out

