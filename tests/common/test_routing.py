"""services/gateway/routing.py: which pair a request goes to (pure)."""
from __future__ import annotations

import pytest

from services.gateway.routing import PairLoad, RoutingPolicy, choose_pair, retry_target

IDLE = PairLoad("p0", alive=True)


def _pairs(*loads: tuple[int, int]) -> list[PairLoad]:
    return [PairLoad(f"p{i}", alive=True, queued=q, running=r) for i, (q, r) in enumerate(loads)]


def test_the_least_loaded_pair_without_a_cached_prefix():
    assert choose_pair(_pairs((2, 0), (0, 3), (1, 0)), [0, 0, 0], 8, [0, 0, 0]) == 1   # 8, 3, 4 (queued x4)


def test_the_pair_holding_the_prefix_wins_while_loads_are_balanced():
    pairs = _pairs((0, 2), (0, 0))
    assert choose_pair(pairs, [6, 0], 8, [0, 0]) == 0            # 6/8 cached beats a load gap of 2
    assert choose_pair(pairs, [3, 0], 8, [0, 0]) == 1            # below the threshold: load
    assert choose_pair(pairs, [6, 6], 8, [0, 0]) == 1            # equally cached: the less loaded


def test_imbalance_overrides_affinity():
    assert choose_pair(_pairs((3, 0), (0, 0)), [8, 0], 8, [0, 0]) == 1     # 12 vs 0: gap > 4 and > 1.5x


def test_requests_sent_since_the_refresh_count_and_dead_or_draining_pairs_take_none():
    assert choose_pair(_pairs((0, 0), (0, 0)), [0, 0], 0, [1, 0]) == 1
    pairs = [PairLoad("p0", alive=False), PairLoad("p1", alive=True, draining=True), PairLoad("p2", alive=True)]
    assert choose_pair(pairs, [0, 8, 0], 8, [0, 0, 0]) == 2
    assert choose_pair(pairs[:2], [0, 0], 0, [0, 0]) is None


def test_a_retry_goes_to_another_live_pair():
    pairs = _pairs((0, 0), (5, 0), (1, 0))
    assert retry_target(pairs, "p0", [0, 0, 0]) == 2
    assert retry_target([IDLE], "p0", [0]) is None


def test_policy_bounds():
    with pytest.raises(ValueError):
        RoutingPolicy(cache_threshold=0)
