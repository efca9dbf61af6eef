"""Co-residency: the slowdown model, its fit from co-runs, the calibration file, and the policy using it."""
from __future__ import annotations

import json

import pytest

from orchestrator.coresidency import (FORMAT, IDLE, RESIDUAL_PRIOR, CoResidency, CoRun, Demand,
                                      fit_residual, for_device, iteration_demand, load_calibration, runs_from_json,
                                      shared_fraction, stretch, write_calibration)
from orchestrator.perf_model import LLAMA3_8B, DeviceSpec, PerfModel, h100
from orchestrator.policy import SLO, Policy, PolicyConfig, QueueState, Shares, WaitingRequest

PREFILL = Demand(compute=0.8, memory=0.15, bandwidth=0.15)       # compute-bound
DECODE = Demand(compute=0.15, memory=0.7, bandwidth=0.5)         # bandwidth-bound
CO = CoResidency()


def test_disjoint_caps_and_an_idle_partner_cost_nothing():
    assert stretch(PREFILL, DECODE, 0.0, CO) == pytest.approx(1.0)        # disjoint, bandwidth 0.65 < 1
    assert stretch(DECODE, IDLE, 1.0, CO) == pytest.approx(1.0)           # partner idle
    assert shared_fraction(132, 38, 132) == pytest.approx(38 / 132)
    assert shared_fraction(38, 132, 132) == 1.0
    assert shared_fraction(94, 38, 132) == 0.0


def test_each_phase_is_slowed_by_the_others_demand_for_its_resource():
    zero = CoResidency(residual=0.0)
    # Complementary phases on the same SMs: neither resource is oversubscribed, no roofline slowdown.
    assert stretch(PREFILL, DECODE, 1.0, zero) == pytest.approx(1.0)
    # Two compute-bound phases on the same SMs: the issue slots are split by demand.
    assert stretch(PREFILL, PREFILL, 1.0, zero) == pytest.approx(0.05 + 0.8 * 1.6 + 0.15)
    # Only the shared fraction of the units is contended.
    assert 1.0 < stretch(PREFILL, PREFILL, 0.3, zero) < stretch(PREFILL, PREFILL, 1.0, zero)
    # Two bandwidth-bound phases: HBM is device-wide, so even disjoint caps contend.
    heavy = Demand(compute=0.1, memory=0.8, bandwidth=0.8)
    assert stretch(heavy, heavy, 0.0, zero) == pytest.approx(0.1 + 0.1 + 0.8 * 1.6)
    assert stretch(heavy, heavy, 0.0, zero, bandwidth_contention=False) == pytest.approx(1.0)


def test_residual_scales_with_the_shared_fraction():
    co = CoResidency(residual=0.5)
    device_part = DECODE.compute + DECODE.memory
    assert stretch(DECODE, PREFILL, 1.0, co) == pytest.approx(1 - device_part + device_part * 1.5)
    assert stretch(DECODE, PREFILL, 0.5, co) == pytest.approx(1 - device_part + device_part * 1.25)
    # The prior: a complementary pair fully co-resident runs 2 / (1 + residual) = 1.59x faster than serial.
    assert 2 / (1 + RESIDUAL_PRIOR) == pytest.approx(1.59, abs=0.01)


def test_demand_of_the_model_prefill_compute_decode_bandwidth():
    model = PerfModel(h100(), LLAMA3_8B)
    t_p, prefill = iteration_demand(model, "prefill", 132, 2048, 2048 * 2048, 0, 0, 1)
    t_d, decode = iteration_demand(model, "decode", 38, 0, 0, 64, 64 * 1200, 64)
    assert t_p == pytest.approx(model.predict_units_ms("prefill", 132, 2048, 2048 * 2048, 0, 0, 1))
    assert t_d == pytest.approx(model.predict_units_ms("decode", 38, 0, 0, 64, 64 * 1200, 64))
    assert prefill.compute > 0.6 > prefill.memory
    assert decode.memory > 0.5 > decode.compute
    # Co-resident on all 132 SMs, prefill loses far less than the half of decode's 38 SMs time-sharing costs.
    co_slow = stretch(prefill, decode, shared_fraction(132, 38, 132), CO)
    timeshared = model.predict_units_ms("prefill", 132 - 19, 2048, 2048 * 2048, 0, 0, 1) / t_p
    assert 1.0 < co_slow < timeshared


def _runs(residual: float) -> list[CoRun]:
    """Co-runs whose measured times are what the model predicts at `residual`."""
    co = CoResidency(residual=residual)
    runs = []
    for p_units, d_units, p_alone, d_alone in ((132, 40, 50.0, 12.0), (100, 66, 60.0, 10.0)):
        phi_p, phi_d = shared_fraction(p_units, d_units, 132), shared_fraction(d_units, p_units, 132)
        runs.append(CoRun(p_units, d_units, 132, p_alone, d_alone, p_alone * stretch(PREFILL, DECODE, phi_p, co),
                          d_alone * stretch(DECODE, PREFILL, phi_d, co), PREFILL, DECODE))
    return runs


@pytest.mark.parametrize("residual", [0.0, 0.26, 0.8])
def test_fit_recovers_the_residual(residual):
    assert fit_residual(_runs(residual)) == pytest.approx(residual, abs=1e-9)


def test_fit_refuses_runs_without_overlap():
    run = CoRun(66, 66, 132, 50.0, 10.0, 51.0, 11.0, PREFILL, DECODE)
    with pytest.raises(ValueError, match="overlapping"):
        fit_residual([run])
    with pytest.raises(ValueError, match="positive"):
        fit_residual([CoRun(132, 40, 132, 0.0, 10.0, 51.0, 11.0, PREFILL, DECODE)])


def test_calibration_file_round_trip(tmp_path):
    path = tmp_path / "coresidency.json"
    runs = _runs(0.4)
    written = write_calibration(path, "NVIDIA H100 80GB HBM3 (132 SMs)", runs, "2026-12-03T12:00:00Z")
    data = json.loads(path.read_text())
    assert data == written and data["format"] == FORMAT and data["residual"] == pytest.approx(0.4, abs=1e-4)
    assert runs_from_json(data) == runs
    loaded = load_calibration(path)
    assert loaded.enabled and loaded.residual == pytest.approx(0.4, abs=1e-4)
    assert "H100" in loaded.source and "2 co-runs" in loaded.source
    assert for_device("gpu", path) == loaded


def test_calibration_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable"):
        load_calibration(bad)
    bad.write_text(json.dumps({"format": "something else", "residual": 0.1}))
    with pytest.raises(ValueError, match="expected format"):
        load_calibration(bad)
    bad.write_text(json.dumps({"format": FORMAT, "residual": "high"}))
    with pytest.raises(ValueError, match="number"):
        load_calibration(bad)
    with pytest.raises(ValueError):
        CoResidency(residual=-0.1)
    with pytest.raises(ValueError):
        Demand(compute=0.7, memory=0.5)


def test_device_defaults():
    assert for_device("gpu") == CoResidency()
    cpu = for_device("cpu")            # threads on one core are time-sliced: half and half is right there
    assert not cpu.enabled
    assert Policy(PerfModel(DeviceSpec.cpu(2), LLAMA3_8B)).coresidency == cpu
    assert Policy(PerfModel(h100(), LLAMA3_8B)).coresidency.enabled


def _state(waiting: int, batch: int) -> QueueState:
    return QueueState(1000.0, [WaitingRequest(999.9, 2000) for _ in range(waiting)], batch, batch * 1200,
                      20000, 25000)


def test_policy_gives_prefill_the_whole_device_over_decode_when_co_resident():
    """A queue that presses (20 prompts of 2000 tokens) and a running decode batch: co-resident, the
    policy caps prefill at the whole device and decode at its TPOT need (the caps overlap); time-shared,
    the same overlap is worth less than a disjoint split, so it keeps the caps apart."""
    slo = SLO(2000, 50)
    current = Shares(0.6, 0.4, 2048)
    co = Policy(PerfModel(h100(), LLAMA3_8B), PolicyConfig(overlap=1.0, switch_cost_ms=0.0))
    d = co.decide(_state(20, 64), current, slo)
    assert d.shares.prefill == 1.0 and d.shares.prefill + d.shares.decode > 1.0
    off = Policy(PerfModel(h100(), LLAMA3_8B),
                 PolicyConfig(overlap=1.0, switch_cost_ms=0.0, coresidency=CoResidency(enabled=False)))
    d_off = off.decide(_state(20, 64), current, slo)
    assert d_off.shares.prefill + d_off.shares.decode <= 1.0 + 1e-9
    assert d.ttft_headroom > d_off.ttft_headroom


def test_policy_prediction_with_overlap_is_the_stretched_model():
    """The decode prediction at an overlapping split is the model's time alone times `stretch`."""
    model = PerfModel(h100(), LLAMA3_8B)
    policy = Policy(model, PolicyConfig(overlap=1.0, token_budgets=(2048,)))
    slo = SLO(2000, 50)
    shares = Shares(1.0, 40 / 132, 2048)
    policy.pin(shares)
    d = policy.decide(_state(5, 64), shares, slo)
    units = model.units_for(shares.decode)
    alone, decode = iteration_demand(model, "decode", units, 0, 0, 64, 64 * 1200, 64)
    _, prefill = iteration_demand(model, "prefill", 132, 2048, 2048 * 2048, 0, 0, 1)
    expect = alone * stretch(decode, prefill, shared_fraction(units, 132, 132), policy.coresidency)
    assert d.predicted_tpot_ms == pytest.approx(expect)
