"""bench.compare's pure parts: the highest rate meeting the attainment target, ratios, the report table."""
from __future__ import annotations

import argparse

import pytest

from bench.compare import MaxRate, format_table, max_rate, ratio_text, setups_for, summarize


def test_max_rate_interpolates_the_first_crossing():
    got = max_rate([1, 2, 3], [1.0, 0.95, 0.5], 0.9)
    assert got.how == "interpolated" and got.value == pytest.approx(2 + 0.05 / 0.45)
    noisy = max_rate([3, 1, 2], [0.95, 1.0, 0.8], 0.9)          # unsorted and not monotone: first crossing
    assert noisy.value == pytest.approx(1.5)
    assert max_rate([1, 2], [0.9, 0.5], 0.9) == MaxRate(1, "exact")


def test_max_rate_says_when_the_sweep_did_not_bracket_it():
    assert max_rate([1, 2], [1.0, 0.95], 0.9) == MaxRate(2, "at least")
    assert max_rate([1, 2], [0.5, 0.2], 0.9) == MaxRate(1, "below")
    assert MaxRate(2, "at least").text() == ">= 2.00" and MaxRate(1, "below").text() == "< 1"


def test_ratios_carry_the_censoring():
    assert ratio_text(MaxRate(3.0, "interpolated"), MaxRate(1.5, "interpolated")) == "2.00x"
    assert ratio_text(MaxRate(3.0, "at least"), MaxRate(1.5, "interpolated")) == ">= 2.00x"
    assert ratio_text(MaxRate(1.0, "interpolated"), MaxRate(2.0, "at least")) == "<= 0.50x"
    assert ratio_text(MaxRate(1.0, "below"), MaxRate(2.0, "exact")) == "< 0.50x"
    assert ratio_text(MaxRate(2.0, "exact"), MaxRate(0.5, "below")) == "> 4.00x"
    assert ratio_text(MaxRate(0.5, "below"), MaxRate(0.5, "below")) == "n/a"


def test_setups_expand_chunk_sizes():
    names = [s.name for s in setups_for(["colocated", "split-static", "split-dynamic"], [256, 512])]
    assert names == ["colocated-c256", "colocated-c512", "split-static", "split-dynamic"]
    with pytest.raises(ValueError, match="config"):
        setups_for(["disaggregated"], [])


def _run(rate: float, attainment: float) -> dict:
    stats = {"median_ms": 80.0, "percentiles_ms": {"p90": 100.0}}
    return {"rate": rate, "result": {"metrics": {"slo_attainment": attainment, "request_goodput": rate * attainment,
                                                 "request_throughput": rate, "completed": 10, "failed": 0,
                                                 "total_input_tokens": 400, "total_cached_tokens": 100,
                                                 "ttft": stats, "tpot": stats}}}


def test_summary_compares_against_the_best_colocated():
    results = {"colocated-c256": {"runs": [_run(1, 1.0), _run(2, 0.5)]},
               "colocated-c512": {"runs": [_run(1, 1.0), _run(2, 0.8)]},
               "split-dynamic": {"runs": [_run(1, 1.0), _run(2, 0.95)]}}
    summary = summarize(results, [1.0, 2.0], 0.9)
    assert summary["colocated-c512"]["max_rate"]["value"] == pytest.approx(1.5)
    assert {s["vs"] for s in summary.values()} == {"colocated-c512"}
    assert summary["split-dynamic"]["ratio_text"] == ">= 1.33x"
    args = argparse.Namespace(slo_ttft_ms=1000.0, slo_tpot_ms=150.0, attainment=0.9, dataset="azure-conv")
    table = format_table(summary, [1.0, 2.0], args)
    assert "split-dynamic" in table and ">= 2.00 req/s" in table and "vs colocated-c512" in table


def test_a_multi_turn_table_says_its_rates_are_conversation_starts():
    summary = summarize({"split-static-no-cache": {"runs": [_run(0.5, 1.0), _run(1, 0.8)]}}, [0.5, 1.0], 0.9)
    assert summary["split-static-no-cache"]["per_rate"]["0.5"]["cached_share"] == pytest.approx(0.25)
    args = argparse.Namespace(slo_ttft_ms=1000.0, slo_tpot_ms=150.0, attainment=0.9, dataset="multi-turn")
    table = format_table(summary, [0.5, 1.0], args)
    assert "0.75 conv/s" in table and "conversations started per second" in table and "25%" in table
