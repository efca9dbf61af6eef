"""bench.corun, the co-residency co-runs of `make gpu-check`: its pure parts and the calibration file they
write (the co-runs themselves need a GPU and MPS)."""
from __future__ import annotations

import pytest

from bench.corun import KernelResult, corun, kernel_demand, kernel_work, parse_caps, rows, units_for
from orchestrator.coresidency import fit_residual, load_calibration, shared_fraction, write_calibration

SMS = 132
PEAK_FLOPS, PEAK_BW = 700e12, 3.0e12


def _result(role: str, pct: int, ms: float) -> KernelResult:
    flops, nbytes = kernel_work(role)
    return KernelResult(role, pct, ms, flops, nbytes)


def test_kernel_work_and_units():
    flops, nbytes = kernel_work("prefill")
    assert flops == 2.0 * 2048 * 4096 * 28672 and nbytes / flops < 1e-3        # compute-bound
    flops, nbytes = kernel_work("decode")
    assert nbytes / flops > 0.03                                               # bandwidth-bound
    assert units_for(100, SMS) == 132 and units_for(30, SMS) == 38 and units_for(1, SMS) == 2


def test_demands_from_work_and_time():
    flops, _ = kernel_work("prefill")
    gemm = kernel_demand(_result("prefill", 100, flops / PEAK_FLOPS * 1000), PEAK_FLOPS, PEAK_BW, SMS)
    assert gemm.compute > 0.8 > 0.2 > gemm.bandwidth and gemm.compute + gemm.memory <= 1 + 1e-9
    _, nbytes = kernel_work("decode")
    gemv = kernel_demand(_result("decode", 30, nbytes / (0.8 * PEAK_BW) * 1000), PEAK_FLOPS, PEAK_BW, SMS)
    assert gemv.bandwidth == pytest.approx(0.8) and gemv.memory > 0.6 > 0.3 > gemv.compute


def test_caps_must_overlap():
    assert parse_caps("100/30, 70/50") == [(100, 30), (70, 50)]
    for bad in ("60/40", "100/0", "x/30", ""):
        with pytest.raises(ValueError):
            parse_caps(bad)


def test_coruns_fit_and_round_trip_through_the_calibration_file(tmp_path):
    runs = [corun(_result("prefill", 100, 50.0), _result("decode", 30, 2.0), _result("prefill", 100, 54.0),
                  _result("decode", 30, 2.6), PEAK_FLOPS, PEAK_BW, SMS),
            corun(_result("prefill", 70, 70.0), _result("decode", 50, 1.8), _result("prefill", 70, 75.0),
                  _result("decode", 50, 2.2), PEAK_FLOPS, PEAK_BW, SMS)]
    assert runs[0].prefill_units == 132 and runs[0].decode_units == 38
    assert shared_fraction(runs[0].decode_units, runs[0].prefill_units, SMS) == 1.0
    path = tmp_path / "coresidency.json"
    data = write_calibration(path, "NVIDIA H100 (132 SMs)", runs, "2026-12-03T00:00:00Z")
    assert data["residual"] == pytest.approx(fit_residual(runs), abs=1e-4) and data["residual"] > 0
    assert load_calibration(path).residual == pytest.approx(data["residual"])
    table = rows(runs, data["residual"], str(path))
    assert table[0][0] == "co-run 132/38 SMs" and "x1.08" in table[0][1] and "x1.30" in table[0][1]
    assert table[-1][0] == "co-residency residual" and str(path) in table[-1][1]
