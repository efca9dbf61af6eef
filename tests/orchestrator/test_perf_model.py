"""Performance model as plain Python: shapes, physics, priors against measured H100 times, online fit."""
from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.perf_model import (LLAMA2_7B, LLAMA3_8B, Coefficients, DeviceSpec, ModelShape, PerfModel,
                                     fit_coefficients, h100, priors)
from services.common.contracts import IterationSample

REPO = Path(__file__).resolve().parents[2]

# One Llama-2-7B layer on an H100, tensor parallel 1: the sum of the operator medians (ms) of the
# linear layers (attn_pre_proj, attn_post_proj, mlp_up_proj, mlp_down_proj) and the element-wise ops
# (input_layernorm, attn_rope, post_attention_layernorm, mlp_act, add), by num_tokens.
# Source: microsoft/vidur, data/profiling/compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv (MIT).
VIDUR_H100_LLAMA2_7B_LAYER_MS = {
    1: 0.175, 8: 0.172, 32: 0.181, 64: 0.183, 128: 0.199, 192: 0.2315, 256: 0.286, 384: 0.345, 512: 0.3745,
    768: 0.588, 1024: 0.657, 1536: 1.043, 2048: 1.2665, 3072: 1.999, 4096: 2.592,
}


def make_model(device: DeviceSpec | None = None, shape: ModelShape = LLAMA3_8B, **kw) -> PerfModel:
    return PerfModel(device or h100(), shape, **kw)


def make_samples(model: PerfModel, truth: dict[str, Coefficients], n: int, rng: random.Random,
                 noise: float = 0.01) -> list[IterationSample]:
    """Iterations like the workers report, timed by the model's features under `truth` plus noise:
    shares across the device, prefill from a few short prompts to one long one, decode from 1 to 256 rows."""
    samples = []
    step, total = model.device.unit_granularity, model.device.num_units
    for i in range(n):
        phase = "prefill" if i % 2 == 0 else "decode"
        units = rng.randrange(1, total // step + 1) * step
        if phase == "prefill":
            kind = rng.random()
            if kind < 0.3:
                lens = [rng.randint(8, 128) for _ in range(rng.randint(1, 4))]
            elif kind < 0.6:
                lens = [rng.randint(2048, 8192)]
            else:
                lens = [rng.randint(64, 2048) for _ in range(rng.randint(1, 8))]
            tokens, work, rows, context, requests = sum(lens), sum(n * n for n in lens), 0, 0, len(lens)
        else:
            rows = rng.randint(1, 256)
            tokens, work, context, requests = 0, 0, rows * rng.randint(50, 4000), rows
        x = model.features(units, tokens, work, rows, context, requests)
        elapsed = sum(a * f for a, f in zip(truth[phase].as_tuple(), x)) * (1 + rng.gauss(0, noise))
        samples.append(IterationSample(phase, units / total, units, tokens, rows, requests, context, work,
                                       elapsed, float(i)))
    return samples


def assert_within(got: Coefficients, want: Coefficients, tolerance: float) -> None:
    for name, g, w in zip(("overhead_ms", "linear", "attention", "memory"), got.as_tuple(), want.as_tuple()):
        assert abs(g / w - 1) <= tolerance, f"{name}: fitted {g:.4g}, true {w:.4g}"


# ---------------------------------------------------------------------- shapes and units
def test_model_shape_from_model_config():
    cfg = SimpleNamespace(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                          head_dim=64, vocab_size=49152, torch_dtype="bfloat16")
    shape = ModelShape.from_model_config(cfg)
    assert (shape.num_layers, shape.num_kv_heads, shape.param_bytes, shape.kv_bytes) == (30, 3, 2, 2)
    assert ModelShape.from_model_config(cfg, dtype_bytes=4).param_bytes == 4
    assert shape.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    # Llama-2-7B: 6.5 G parameters in the layers plus the 131 M of the LM head.
    assert LLAMA2_7B.weight_bytes / 2 == pytest.approx(32 * 202_375_168 + 32000 * 4096)


def test_units_are_whole_cores_or_tpcs():
    gpu = make_model()
    assert gpu.units_for(0.5) == 66
    assert gpu.units_for(0.3) == 38            # 39.6 SMs: rounded down to whole TPCs
    assert gpu.units_for(0.0) == 2             # at least one TPC
    assert gpu.units_for(1.0) == 132
    cpu = make_model(DeviceSpec.cpu(8))
    assert [cpu.units_for(s) for s in (0.125, 0.3, 0.5, 1.0)] == [1, 2, 4, 8]


def test_bandwidth_saturates_below_the_full_device():
    model = make_model()
    assert model.bandwidth(132) == model.bandwidth(54) == 3.0e12       # 54 SMs > 0.4 of the device
    assert model.bandwidth(26) == pytest.approx(3.0e12 * (26 / 132) / 0.4)


def test_decode_flattens_past_saturation_and_prefill_scales_with_share():
    model = make_model()
    decode = [model.predict_decode_ms(s, 32, 32 * 1000) for s in (0.1, 0.2, 0.5, 1.0)]
    assert decode == sorted(decode, reverse=True)
    assert decode[0] > 2.5 * decode[2]                     # memory-bound: bandwidth grows up to 0.4
    assert decode[2] < 1.25 * decode[3]                    # and barely after it
    half, full = model.predict_prefill_ms(0.5, 8192, 8192 ** 2), model.predict_prefill_ms(1.0, 8192, 8192 ** 2)
    assert 1.8 < half / full < 2.05                        # compute-bound: time ~ 1 / share


def test_wave_quantization_makes_steps_not_a_curve():
    model = make_model()
    # 64 tokens: the largest GEMM (gate/up, 28672 columns) is 448 tiles of 64 x 64, 4 waves on 112..148
    # SMs; a smooth 1 / units model would make 128 SMs 1.6% slower than 130.
    lin = {u: model.features(u, 64, 0, 0, 0, 0)[1] for u in (110, 112, 128, 130)}
    assert lin[128] == lin[130]
    assert lin[110] > lin[112]


# ---------------------------------------------------------------------- priors
def test_h100_prior_reproduces_vidur_linear_layers():
    """One layer's linear and element-wise ops, 1..4096 tokens, from the prior alone (no overhead term:
    vidur times kernels, not the per-iteration launch and Python cost)."""
    model = make_model(shape=LLAMA2_7B)
    c = model.coefficients["prefill"]
    errors = []
    for tokens, measured in VIDUR_H100_LLAMA2_7B_LAYER_MS.items():
        _, x_lin, _, x_mem = model.features(132, tokens, 0, 0, 0, 0)
        predicted = (c.linear * x_lin + c.memory * x_mem) / LLAMA2_7B.num_layers
        errors.append(abs(predicted - measured) / measured)
    errors.sort()
    assert errors[len(errors) // 2] < 0.10 and errors[-1] < 0.25, errors


def test_priors_exist_per_backend_and_phase():
    for kind in ("cpu", "gpu"):
        p = priors(kind, LLAMA3_8B)
        assert set(p) == {"prefill", "decode", "colocated"}
        assert all(min(c.as_tuple()) > 0 for c in p.values())
    with pytest.raises(ValueError):
        priors("tpu", LLAMA3_8B)


def test_prior_predicts_llama3_8b_decode_near_reported_latency():
    """vLLM (2024) decodes Llama-3-8B on an H100 at about 13 ms per token under light load."""
    assert 8 < make_model().predict_decode_ms(1.0, 16, 16 * 1000) < 16


# ---------------------------------------------------------------------- calibration
def test_calibration_recovers_known_coefficients_within_5_percent():
    model = make_model()
    p = model.prior
    truth = {"prefill": Coefficients(p["prefill"].overhead_ms * 0.7, 1.2, 1.4, 1.3),
             "decode": Coefficients(p["decode"].overhead_ms * 1.3, 0.9, 1.8, 1.25)}
    for sample in make_samples(model, truth, 512, random.Random(0)):
        model.observe(sample)
    assert model.refit() == ["prefill", "decode"]
    assert_within(model.coefficients["prefill"], truth["prefill"], 0.05)
    assert_within(model.coefficients["decode"], truth["decode"], 0.05)
    assert model.coefficients["colocated"] == model.prior["colocated"]      # no samples: the prior stays
    stats = model.error_stats()
    assert set(stats) == {"prefill", "decode"} and stats["decode"].count == 256
    assert stats["decode"].p90 >= stats["decode"].median > 0


def test_calibration_tracks_a_change_in_the_coefficients():
    """Another tenant takes bandwidth mid-run: memory and attention get slower, the overhead grows."""
    model = make_model(history=256)
    rng = random.Random(1)
    before = {"prefill": Coefficients(3.0, 1.1, 1.2, 1.1), "decode": Coefficients(3.0, 1.0, 1.5, 1.1)}
    after = {"prefill": Coefficients(4.5, 1.1, 1.5, 1.6), "decode": Coefficients(4.5, 1.0, 2.2, 1.6)}
    for sample in make_samples(model, before, 512, rng):
        model.observe(sample)
    model.refit()
    assert_within(model.coefficients["decode"], before["decode"], 0.05)
    settled = model.error_stats()["decode"].median
    errors = []
    for i, sample in enumerate(make_samples(model, after, 768, rng)):
        errors.append(model.observe(sample))
        if i % 16 == 15:
            model.refit()                                    # the orchestrator refits every tick
    assert sum(errors[:16]) / 16 > 0.12 > 3 * settled        # the change shows in the honest error ...
    assert_within(model.coefficients["prefill"], after["prefill"], 0.05)
    assert_within(model.coefficients["decode"], after["decode"], 0.05)
    assert model.error_stats()["decode"].median < 0.05      # ... and is gone once the window turned over


def test_the_prior_decides_what_the_data_cannot():
    """Decode at one share only: overhead and the weight read are collinear; the fit stays finite,
    non-negative and predicts the samples well."""
    model = make_model()
    truth = Coefficients(2.0, 1.0, 1.5, 1.2)
    rng = random.Random(2)
    for _ in range(64):
        rows = rng.randint(1, 128)
        context = rows * rng.randint(100, 2000)
        x = model.features(66, 0, 0, rows, context, rows)
        elapsed = sum(a * f for a, f in zip(truth.as_tuple(), x))
        model.observe(IterationSample("decode", 0.5, 66, 0, rows, rows, context, 0, elapsed, 0.0))
    model.refit()
    fitted = model.coefficients["decode"]
    assert min(fitted.as_tuple()) >= 0
    assert model.predict_decode_ms(0.5, 64, 64_000) == pytest.approx(
        sum(a * f for a, f in zip(truth.as_tuple(), model.features(66, 0, 0, 64, 64_000, 64))), rel=0.02)


def test_fit_is_non_negative():
    """Data that wants a negative overhead gets zero, and the rest is solved again."""
    rows = [((1.0, x, 0.0, 0.0), 2.0 * x - 1.0) for x in (1.0, 2.0, 4.0, 8.0, 16.0)]
    fitted = fit_coefficients(rows, Coefficients(1.0, 1.0, 1.0, 1.0), ridge=0.0)
    assert fitted.overhead_ms == 0.0
    # t = a1 * x alone, weighted by 1 / t^2: a1 = sum(x / t) / sum(x^2 / t^2)
    expected = sum(x[1] / t for x, t in rows) / sum((x[1] / t) ** 2 for x, t in rows)
    assert fitted.linear == pytest.approx(expected)
    assert fitted.attention == fitted.memory == 1.0          # never seen: the prior


def test_observe_skips_empty_and_unknown_iterations():
    model = make_model()
    assert model.observe(IterationSample("decode", 0.5, 66, 0, 0, 0, 0, 0, 1.0, 0.0)) is None
    assert model.observe(IterationSample("mystery", 0.5, 66, 10, 0, 1, 0, 100, 1.0, 0.0)) is None
    assert model.error_stats() == {} and model.refit() == []


def test_error_is_measured_before_the_fit_that_uses_the_sample():
    model = make_model()
    truth = {"prefill": Coefficients(1.0, 2.0, 2.0, 2.0), "decode": Coefficients(1.0, 2.0, 2.0, 2.0)}
    errors = [model.observe(s) for s in make_samples(model, truth, 64, random.Random(3), noise=0.0)]
    assert min(errors) > 0.2                                 # the prior is far off: the error says so
    model.refit()
    assert model.error_stats()["prefill"].median > 0.2       # refitting does not rewrite history
    errors = [model.observe(s) for s in make_samples(model, truth, 16, random.Random(4), noise=0.0)]
    assert max(errors) < 0.01


def test_predict_is_cheap():
    model = make_model()
    start = time.perf_counter()
    for i in range(20_000):
        model.predict_decode_ms(0.25 + (i % 50) / 100, 1 + i % 200, 1000 * (1 + i % 200))
        model.predict_prefill_ms(0.5, 256 + i, 256 * (256 + i))
    assert time.perf_counter() - start < 1.0                 # ~25 us per pair at worst


# ---------------------------------------------------------------------- purity
def test_perf_model_and_policy_import_nothing_heavy():
    code = ("import sys, orchestrator.perf_model, orchestrator.policy; "
            "print(','.join(m for m in ('torch', 'grpc', 'redis', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "", f"pulled in {out.stdout.strip()}"
