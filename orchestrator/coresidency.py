"""Co-residency: how much a prefill and a decode iteration slow each other when their MPS caps overlap.

Pure Python (no torch, grpc, redis or numpy): the policy and the simulator call it per prediction.
docs/performance-model.md ("Co-residency") has the model, its sources and the calibration file.

An MPS active-thread percentage is a cap, not a reservation: two caps that sum to more than the device
put both processes' thread blocks on the same SMs. The shared SMs are then not time-shared half and half;
each resource is shared in proportion to demand (a roofline view of the two kernels):

  compute    on the shared fraction phi of its units, a phase gets 1 / L_c of their issue slots when the
             two phases' compute fractions sum to L_c > 1; elsewhere its units are its own
  bandwidth  HBM is one device-wide resource: when the two phases draw L_b > 1 of it, every memory-bound
             part stretches by L_b (whether or not the caps overlap)
  residual   what the roofline does not see (shared L2, register and shared-memory occupancy, the block
             scheduler) stretches the device-bound part of the iteration by 1 + residual * phi

So prefill (compute-bound) loses little to decode (whose compute fraction is small) and decode
(bandwidth-bound) loses little to prefill (which draws little bandwidth): each phase is slowed by the
other's demand for the resource it is bound by. `residual` is the one free parameter: a published
prior until `make gpu-check` measures a prefill and a decode process co-running (`fit_residual`), written
to a calibration file that the orchestrator and the simulator read (`load_calibration`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from orchestrator.perf_model import PerfModel

FORMAT = "duoserve-coresidency/1"
# POD-Attention (Kamath et al., ASPLOS 2025, arXiv 2410.18038): prefill and decode attention co-located on
# the same SMs ran up to 1.59x faster than the two run one after the other (mean 1.28x over its mixes).
# For a perfectly complementary pair (one compute-only, one bandwidth-only, all SMs shared) this model
# predicts 2 / (1 + residual) over the serial time, so 1.59x gives residual = 2 / 1.59 - 1 = 0.26. The
# best case is taken because the mean includes mixes that are far from balanced (where even ideal overlap
# gains little). It is a prior: two MPS processes may co-reside worse than one fused kernel.
RESIDUAL_PRIOR = 0.26
RESIDUAL_PRIOR_SOURCE = "prior: POD-Attention (arXiv 2410.18038) best co-located prefill+decode speedup 1.59x"
MAX_RESIDUAL = 4.0


@dataclass(frozen=True, slots=True)
class Demand:
    """What one iteration asks of the device, as fractions of its own time alone at its cap."""

    compute: float = 0.0       # of the iteration, the part its units spend computing (GEMMs, prefill attention)
    memory: float = 0.0        # the part spent streaming from HBM (weights, KV reads, activations)
    bandwidth: float = 0.0     # the device's HBM bandwidth it draws, averaged over the iteration

    def __post_init__(self) -> None:
        if min(self.compute, self.memory, self.bandwidth) < 0 or self.compute + self.memory > 1 + 1e-9:
            raise ValueError("demand fractions must be >= 0 and compute + memory <= 1")


IDLE = Demand()


@dataclass(frozen=True, slots=True)
class CoResidency:
    """The co-residency model's switch and parameter. Disabled: overlapping units are time-shared half
    and half (the model before co-residency), kept to compare against."""

    enabled: bool = True
    residual: float = RESIDUAL_PRIOR      # extra stretch of the device-bound part, per unit of shared fraction
    source: str = RESIDUAL_PRIOR_SOURCE   # where `residual` comes from, for reports

    def __post_init__(self) -> None:
        if not 0 <= self.residual <= MAX_RESIDUAL:
            raise ValueError(f"residual must be in [0, {MAX_RESIDUAL}]")


def for_device(kind: str, calibration: str | Path | None = None) -> CoResidency:
    """The model a device kind gets: a GPU the calibration file's parameters (or the prior); a CPU none.
    Two processes on one core are time-sliced by the kernel, so half and half is the right model there."""
    if calibration is not None:
        return load_calibration(calibration)
    return CoResidency() if kind == "gpu" else CoResidency(enabled=False, residual=0.0, source="cpu: time-shared")


def stretch(own: Demand, other: Demand, shared_fraction: float, params: CoResidency,
            bandwidth_contention: bool = True) -> float:
    """Own iteration time while the other phase runs, over own time alone at its cap (>= 1).

    `shared_fraction`: the part of own units the other's cap also covers (0 for disjoint caps).
    """
    phi = min(1.0, max(0.0, shared_fraction))
    rest = max(0.0, 1.0 - own.compute - own.memory)          # overhead and host time: not slowed
    compute_load = own.compute + other.compute
    compute = own.compute
    if phi > 0 and compute_load > 1.0:
        compute /= (1.0 - phi) + phi / compute_load           # issue slots of the shared units split by demand
    memory = own.memory
    bandwidth_load = own.bandwidth + other.bandwidth
    if bandwidth_contention and bandwidth_load > 1.0:
        memory *= bandwidth_load
    residual = 1.0 + (params.residual * phi if phi > 0 and (other.compute or other.memory) else 0.0)
    return rest + (compute + memory) * residual


def iteration_demand(model: PerfModel, phase: str, units: float, prefill_tokens: int, attention_work: int,
                     decode_rows: int, context_tokens: int, sampled_rows: int,
                     extra_ms: float = 0.0) -> tuple[float, Demand]:
    """(predicted ms, Demand) of one iteration alone at `units`. Compute: the GEMMs, and attention except in
    decode (prefill attention is compute-bound); memory: the bytes, and decode's attention (KV reads).
    `extra_ms` is host time counted in the iteration (the simulator's loop gap)."""
    a0, a1, a2, a3 = model.coefficients[phase].as_tuple()
    _, x_lin, x_attn, x_mem = model.features(units, prefill_tokens, attention_work, decode_rows, context_tokens,
                                             sampled_rows)
    attention = a2 * x_attn
    compute = a1 * x_lin + (0.0 if phase == "decode" else attention)
    memory = a3 * x_mem + (attention if phase == "decode" else 0.0)
    total = a0 + compute + memory + extra_ms
    if total <= 0:
        return 0.0, IDLE
    drawn = memory * model.bandwidth(units) / model.device.peak_mem_bw / total
    return total, Demand(compute / total, memory / total, drawn)


def shared_fraction(units: float, other_units: float, num_units: int) -> float:
    """The part of `units` that the other cap covers too (the two caps overlap by their sum over the device)."""
    if units <= 0:
        return 0.0
    return min(1.0, max(0.0, units + other_units - num_units) / units)


# ---------------------------------------------------------------------------------------------- calibration

@dataclass(frozen=True, slots=True)
class CoRun:
    """One `make gpu-check` co-run: a prefill and a decode process at overlapping caps, each alone, then both."""

    prefill_units: int
    decode_units: int
    num_units: int
    prefill_alone_ms: float
    decode_alone_ms: float
    prefill_together_ms: float
    decode_together_ms: float
    prefill_demand: Demand = field(default_factory=Demand)   # from the work each did and its time alone
    decode_demand: Demand = field(default_factory=Demand)

    def measured(self) -> tuple[float, float]:
        """(prefill, decode) time together over time alone."""
        return (self.prefill_together_ms / self.prefill_alone_ms, self.decode_together_ms / self.decode_alone_ms)


def fit_residual(runs: Sequence[CoRun]) -> float:
    """The residual that makes `stretch` reproduce the measured slowdowns, averaged over both phases of every
    run with overlapping caps: each measured slowdown s against the roofline's s0 (residual 0) gives
    residual = (s / s0 - 1) / (phi * device-bound fraction). Clamped to [0, MAX_RESIDUAL]."""
    zero = CoResidency(residual=0.0)
    estimates = []
    for run in runs:
        if min(run.prefill_alone_ms, run.decode_alone_ms, run.prefill_together_ms, run.decode_together_ms) <= 0:
            raise ValueError("co-run times must be positive")
        pairs = ((run.prefill_demand, run.decode_demand, run.prefill_units, run.decode_units, run.measured()[0]),
                 (run.decode_demand, run.prefill_demand, run.decode_units, run.prefill_units, run.measured()[1]))
        for own, other, units, other_units, measured in pairs:
            phi = shared_fraction(units, other_units, run.num_units)
            bound = own.compute + own.memory
            if phi <= 0 or bound <= 0:
                continue
            base = stretch(own, other, phi, zero)
            rest = max(0.0, 1.0 - bound)
            device_part = base - rest                     # = (compute + memory) after the roofline's stretch
            if device_part <= 0:
                continue
            estimates.append(((measured - rest) / device_part - 1.0) / phi)
    if not estimates:
        raise ValueError("no co-run with overlapping caps and device-bound work to fit")
    return min(MAX_RESIDUAL, max(0.0, sum(estimates) / len(estimates)))


def calibration_json(device: str, runs: Sequence[CoRun], measured_at: str = "") -> dict[str, Any]:
    """The calibration file's content: the fitted residual and the runs it came from."""
    return {"format": FORMAT, "device": device, "measured_at": measured_at,
            "residual": round(fit_residual(runs), 4), "runs": [asdict(r) for r in runs]}


def write_calibration(path: str | Path, device: str, runs: Sequence[CoRun], measured_at: str = "") -> dict[str, Any]:
    data = calibration_json(device, runs, measured_at)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    return data


def load_calibration(path: str | Path) -> CoResidency:
    """The model's parameters from a calibration file written by `make gpu-check`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable co-residency calibration ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a co-residency calibration (expected format {FORMAT!r})")
    residual = data.get("residual")
    if not isinstance(residual, (int, float)) or not math.isfinite(residual):
        raise ValueError(f"{path}: residual must be a number")
    runs = len(data.get("runs") or [])
    return CoResidency(True, float(residual),
                       f"measured: {data.get('device', '?')} {data.get('measured_at', '')}, {runs} co-runs ({path})")


def runs_from_json(data: dict[str, Any]) -> list[CoRun]:
    """The runs of a calibration file's content (to refit, or to report)."""
    out = []
    for raw in data.get("runs") or []:
        raw = dict(raw)
        raw["prefill_demand"] = Demand(**raw.get("prefill_demand", {}))
        raw["decode_demand"] = Demand(**raw.get("decode_demand", {}))
        out.append(CoRun(**raw))
    return out
