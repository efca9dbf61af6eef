"""Which pair a request goes to: prefix-cache affinity, balanced against load. Pure (no redis).

The shape of SGLang's cache-aware router (sglang-router `cache_aware`), with its state read from
Redis instead of guessed: a pair's prefix cache is its allocator's block index, so the match is the
number of the prompt's leading full blocks that pair really holds now (services/gateway/pairs.py
looks them up), not a tree of what was routed where.

  eligible   a pair whose prefill and decode workers both reported recently (`alive`) and that is
             not draining; none eligible: the request is refused (UNAVAILABLE, retry)
  balanced?  when the most and the least loaded eligible pairs differ by more than `balance_abs`
             requests and by more than `balance_rel` times, the least loaded wins, cache or not
             (a hot prefix must not pile a burst onto one pair)
  affinity   else the pair holding the longest cached run of the prompt's blocks wins if it covers
             at least `cache_threshold` of them; ties by load
  load       else the least loaded: requests waiting for prefill count `queued_weight` each (they
             decide TTFT), running ones 1, and requests this gateway sent since the last refresh are
             added (the view is a few hundred ms old; a burst must not all see the same idle pair)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class PairLoad:
    """One pair as the last refresh saw it."""

    prefix: str                # its Redis key space (duoserve/pairs.py)
    alive: bool                # prefill and decode reported within the liveness window
    draining: bool = False     # an operator drains it: no new requests, its own finish in place
    queued: int = 0            # prefill-queue entries (waiting, or being prefilled)
    running: int = 0           # requests decode is generating
    kv_free: float = 1.0       # share of its KV pool free or evictable


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    cache_threshold: float = 0.5     # affinity when a pair holds at least this share of the prompt's blocks
    balance_abs: float = 4.0         # imbalance: the load gap beyond this many requests ...
    balance_rel: float = 1.5         # ... and beyond this ratio, then load wins over cache
    queued_weight: float = 4.0       # a waiting request weighs this many running ones

    def __post_init__(self) -> None:
        if not 0.0 < self.cache_threshold <= 1.0 or self.balance_abs < 0 or self.balance_rel < 1 \
                or self.queued_weight <= 0:
            raise ValueError("need 0 < cache_threshold <= 1, balance_abs >= 0, balance_rel >= 1, queued_weight > 0")


def load_of(pair: PairLoad, sent_since: int, policy: RoutingPolicy) -> float:
    """Requests on a pair, waiting ones weighted; `sent_since`: this gateway's since the refresh."""
    return (pair.queued + sent_since) * policy.queued_weight + pair.running


def choose_pair(pairs: Sequence[PairLoad], cached_blocks: Sequence[int], prompt_blocks: int,
                sent_since: Sequence[int], policy: RoutingPolicy = RoutingPolicy()) -> int | None:
    """The index of the pair a request goes to, None when no pair may take it. `cached_blocks[i]`:
    the prompt's leading full blocks pair i holds; `prompt_blocks`: the prompt's full blocks."""
    eligible = [i for i, p in enumerate(pairs) if p.alive and not p.draining]
    if not eligible:
        return None
    loads = {i: load_of(pairs[i], sent_since[i], policy) for i in eligible}
    least = min(eligible, key=lambda i: (loads[i], -pairs[i].kv_free, i))
    most = max(loads.values())
    if most - loads[least] > policy.balance_abs and most > policy.balance_rel * loads[least]:
        return least                          # imbalanced: load first
    if prompt_blocks > 0:
        best = max(eligible, key=lambda i: (cached_blocks[i], -loads[i], -i))
        if cached_blocks[best] >= policy.cache_threshold * prompt_blocks:
            return best
    return least


def retry_target(pairs: Sequence[PairLoad], failed: str, sent_since: Sequence[int],
                 policy: RoutingPolicy = RoutingPolicy()) -> int | None:
    """Where a request of the dead pair `failed` is sent again: the least loaded other eligible pair."""
    others = [p if p.prefix != failed else PairLoad(p.prefix, alive=False) for p in pairs]
    return choose_pair(others, [0] * len(pairs), 0, sent_since, policy)
