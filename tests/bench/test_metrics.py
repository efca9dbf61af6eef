"""bench.serve's metrics against vLLM's definitions (benchmark_serving.calculate_metrics), on hand-built records."""
from __future__ import annotations

import math

import pytest

from bench.serve import LatencyStats, RequestRecord, compute_metrics


def make_record(index: int = 0, *, ttft: float = 0.1, e2e: float = 1.0, out: int = 10, prompt: int = 20,
                itl: list[float] | None = None, success: bool = True) -> RequestRecord:
    return RequestRecord(index=index, prompt_len=prompt, output_len=out, scheduled_s=0.0, success=success,
                         ttft_s=ttft, e2e_s=e2e, itl_s=itl if itl is not None else [],
                         output_tokens=out if success else 0)


def test_tpot_excludes_the_first_token():
    r = make_record(ttft=0.2, e2e=1.1, out=10)
    assert r.tpot_s == pytest.approx((1.1 - 0.2) / 9)
    assert make_record(out=1).tpot_s == 0.0           # vLLM: TPOT 0 with one output token


def test_throughputs_count_completed_requests_over_the_duration():
    records = [make_record(0, out=10, prompt=20), make_record(1, out=4, prompt=30),
               make_record(2, success=False, prompt=50)]
    m = compute_metrics(records, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert m.total_input_tokens == 50 and m.total_output_tokens == 14      # failed requests count nothing
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(7.0)
    assert m.total_token_throughput == pytest.approx(32.0)


def test_latency_stats_are_numpy_linear_percentiles_in_ms():
    records = [make_record(i, ttft=t, e2e=2.0) for i, t in enumerate([0.1, 0.2, 0.3, 0.4])]
    ttft = compute_metrics(records, 1.0).ttft
    assert ttft.mean_ms == pytest.approx(250.0)
    assert ttft.median_ms == pytest.approx(250.0)
    assert ttft.std_ms == pytest.approx(math.sqrt(((150**2) * 2 + (50**2) * 2) / 4))   # population std, as np.std
    assert ttft.percentiles_ms["p90"] == pytest.approx(370.0)      # 100 + 0.9 * 3 * 100: linear interpolation
    assert ttft.percentiles_ms["p99"] == pytest.approx(397.0)
    assert ttft.count == 4


def test_tpot_stats_leave_out_single_token_requests_but_itl_pools_every_gap():
    records = [make_record(0, ttft=0.1, e2e=1.0, out=10, itl=[0.1] * 9),
               make_record(1, ttft=0.1, e2e=0.1, out=1, itl=[]),
               make_record(2, ttft=0.1, e2e=0.5, out=3, itl=[0.3, 0.1])]
    m = compute_metrics(records, 1.0)
    assert m.tpot.count == 2
    assert m.tpot.mean_ms == pytest.approx((100.0 + 200.0) / 2)
    assert m.itl.count == 11
    assert m.itl.mean_ms == pytest.approx((0.9 + 0.4) / 11 * 1000)
    assert m.e2e.median_ms == pytest.approx(500.0)


def test_goodput_needs_both_slos_and_the_targets_are_inclusive():
    records = [make_record(0, ttft=0.5, e2e=0.5 + 9 * 0.1, out=10),    # TTFT at target, TPOT at target: good
               make_record(1, ttft=0.6, e2e=1.0, out=10),              # TTFT over
               make_record(2, ttft=0.1, e2e=0.1 + 9 * 0.2, out=10),    # TPOT over
               make_record(3, ttft=0.2, e2e=0.2, out=1),               # one token: TPOT 0, good
               make_record(4, success=False)]                          # failed: never good
    m = compute_metrics(records, duration_s=4.0, slo_ttft_ms=500, slo_tpot_ms=100)
    assert m.good == 2
    assert m.request_goodput == pytest.approx(0.5)
    assert m.slo_attainment == pytest.approx(2 / 5)                    # over all requests, failed included


def test_one_slo_judges_only_that_one_and_none_gives_no_goodput():
    records = [make_record(0, ttft=0.1, e2e=5.0, out=2), make_record(1, ttft=3.0, e2e=3.1, out=2)]
    assert compute_metrics(records, 1.0, slo_ttft_ms=1000).good == 1
    assert compute_metrics(records, 1.0, slo_tpot_ms=1000).good == 1
    m = compute_metrics(records, 1.0)
    assert m.good is None and m.request_goodput is None and m.slo_attainment is None


def test_no_completed_request_gives_zeros_not_errors():
    m = compute_metrics([make_record(0, success=False)], 1.0, slo_ttft_ms=1.0)
    assert m.completed == 0 and m.ttft.mean_ms == 0.0 and m.ttft.count == 0
    assert m.slo_attainment == 0.0
    assert LatencyStats.of([], [50]).percentiles_ms == {"p50": 0.0}
