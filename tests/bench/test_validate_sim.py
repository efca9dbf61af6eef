"""validate-sim's arithmetic, as plain Python: the loop gaps it reads from iteration samples and the
percentile comparison it passes or fails on (the whole check against a real stack is in
tests/e2e/test_sim_validation.py)."""
from __future__ import annotations

import pytest

from bench.validate_sim import compare, loop_gaps


def _sample(phase: str, end: float, elapsed_ms: float) -> dict:
    return {"phase": phase, "time": end, "elapsed_ms": elapsed_ms}


def test_loop_gaps_are_the_host_time_between_back_to_back_iterations():
    # decode: 50 ms iterations ending every 53 ms (3 ms gaps), then an idle second (not back to back)
    ends = [1.0 + 0.053 * i for i in range(5)] + [3.0]
    samples = [_sample("decode", t, 50.0) for t in ends] + [_sample("prefill", 1.0, 200.0)]
    gaps = loop_gaps(samples)
    assert gaps["decode"]["back_to_back"] == 4                    # the idle gap is left out
    assert gaps["decode"]["median_gap_ms"] == pytest.approx(3.0)
    assert gaps["decode"]["samples"] == 6
    assert "prefill" not in gaps                                   # one sample: no pair


def test_compare_takes_numpy_percentiles_and_the_tolerance_both_ways():
    real = {"ttft": [100.0] * 10, "tpot": [10.0 * (i + 1) for i in range(10)]}
    sim = {"ttft": [119.0] * 10, "tpot": [8.5 * (i + 1) for i in range(10)]}
    rows = {(c.metric, c.quantile): c for c in compare(real, sim, 0.2)}
    assert rows[("ttft", 50)].rel_error == pytest.approx(0.19) and rows[("ttft", 50)].ok
    assert rows[("tpot", 50)].real_ms == pytest.approx(55.0)       # linear interpolation, as bench serve
    assert rows[("tpot", 90)].rel_error == pytest.approx(-0.15) and rows[("tpot", 90)].ok
    assert not compare(real, {"ttft": [121.0] * 10, "tpot": sim["tpot"]}, 0.2)[0].ok
