"""Predicted iteration time of a prefill, decode or colocated batch at a compute share.

Pure Python (no torch, grpc, redis or numpy): the policy and the simulator call `predict_*` thousands
of times per tick. The formulas, the fit and where every prior comes from: docs/performance-model.md.

  t(s) = a0 + a1 * X_lin(s) + a2 * X_attn(s) + a3 * X_mem(s)                                [ms]

  X_lin    linear-layer (GEMM) FLOPs at the peak of the units that share s buys, wave-quantized:
           a GEMM is cut into tile_m x tile_n output tiles that run in ceil(tiles / units) waves
  X_attn   attention at its own roofline, max(FLOPs / compute(s), KV bytes / bandwidth(s)), for the
           prefill chunks (compute-bound) plus the same for the decode rows (memory-bound)
  X_mem    weight, element-wise activation and KV-write bytes over bandwidth(s) = B * min(1, s / s_sat)
  a0..a3   `Coefficients`, one set per phase: a0 the fixed per-iteration overhead in ms, a1..a3 the
           measured time over the ideal time of each resource (1 / efficiency)

The model is linear in a0..a3, so `refit` is a small weighted least-squares problem over a bounded
history of `IterationSample`s, regularized toward the prior and kept non-negative.
"""
from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from services.common.shares import UnitSpace

if TYPE_CHECKING:      # duck-typed at run time: anything with IterationSample's fields will do
    from services.common.contracts import IterationSample

PHASES = ("prefill", "decode", "colocated")

Features = tuple[float, float, float, float]     # (1, X_lin, X_attn, X_mem), all but the first in ms


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """The compute units a share is cut from, and what one unit can do."""

    kind: str                        # "cpu" | "gpu"
    num_units: int                   # cores (cpu) or SMs (gpu)
    peak_flops_per_unit: float       # FLOP/s one unit sustains on a large GEMM (measured, not the datasheet)
    peak_mem_bw: float               # bytes/s of the whole device (measured copy bandwidth)
    bw_saturation_share: float       # share of the device at which memory bandwidth saturates, in (0, 1]
    unit_granularity: int = 1        # units are handed out in steps of this (2: one TPC of an NVIDIA GPU)
    tile_m: int = 128                # GEMM output tile, rows (tokens): the unit of work spread over units
    tile_n: int = 128                # GEMM output tile, columns

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"kind must be 'cpu' or 'gpu', not {self.kind!r}")
        if self.num_units < 1 or self.unit_granularity < 1 or self.num_units % self.unit_granularity:
            raise ValueError("num_units must be a positive multiple of unit_granularity")
        if self.peak_flops_per_unit <= 0 or self.peak_mem_bw <= 0:
            raise ValueError("peak_flops_per_unit and peak_mem_bw must be positive")
        if not 0 < self.bw_saturation_share <= 1:
            raise ValueError("bw_saturation_share must be in (0, 1]")
        if self.tile_m < 1 or self.tile_n < 1:
            raise ValueError("tile_m and tile_n must be at least 1")

    @classmethod
    def cpu(cls, num_cores: int, flops_per_core: float = 60e9, bw_per_core: float = 10e9,
            bw_saturation_share: float = 1.0) -> "DeviceSpec":
        """A CPU whose cores each sustain `flops_per_core` (fp32 GEMM) and add `bw_per_core` of bandwidth."""
        return cls("cpu", num_cores, flops_per_core, bw_per_core * num_cores, bw_saturation_share,
                   unit_granularity=1, tile_m=64, tile_n=64)

    @property
    def unit_space(self) -> UnitSpace:
        """The units a share buys here (services.common.shares: the one conversion)."""
        return UnitSpace("cuda" if self.kind == "gpu" else "cpu", self.num_units, self.unit_granularity)


def h100() -> DeviceSpec:
    """H100 SXM: 132 SMs in 66 TPCs, ~800 TFLOP/s dense bf16 measured, ~3.0 TB/s measured copy.

    Decode saturates HBM with well under half the SMs (Bullet, semi-PD); 0.4 is the prior. The 64 x 64
    tile is the effective work unit that best reproduces vidur's measured Llama-2-7B linear layers
    (cuBLAS splits small GEMMs finer than one 128 x 128 block per SM).
    """
    return DeviceSpec("gpu", 132, 800e12 / 132, 3.0e12, 0.4, unit_granularity=2, tile_m=64, tile_n=64)


def gpu_prior(num_sms: int, prior: DeviceSpec | None = None) -> DeviceSpec:
    """The GPU prior (`h100()`) for a GPU of `num_sms` SMs, as the workers measured it: the same FLOP/s
    per SM, copy bandwidth and saturation share, so a part with fewer SMs (an H100 PCIe's 114, a MIG
    slice) is predicted with GPU coefficients over the units it really has. The fit corrects the rest."""
    prior = prior or h100()
    units = UnitSpace.cuda(num_sms).num_units
    return DeviceSpec("gpu", units, prior.peak_flops_per_unit, prior.peak_mem_bw, prior.bw_saturation_share,
                      unit_granularity=UnitSpace.cuda(num_sms).step, tile_m=prior.tile_m, tile_n=prior.tile_n)


def device_for(backend: str, num_units: int) -> DeviceSpec:
    """The DeviceSpec a stack's orchestrator predicts with: `DeviceSpec.cpu` over the stack's cores, or
    the GPU prior over the SMs the workers measured."""
    if backend == "cuda":
        return gpu_prior(num_units)
    if backend == "cpu":
        return DeviceSpec.cpu(num_units)
    raise ValueError(f"device must be cpu or cuda, not {backend!r}")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the cost of a forward pass depends on (a Llama-family decoder)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int               # query heads
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    param_bytes: int = 2         # bytes per weight and per activation element
    kv_bytes: int = 2            # bytes per KV cache element

    @classmethod
    def from_model_config(cls, cfg: Any, dtype_bytes: int | None = None) -> "ModelShape":
        """From a ModelConfig (or anything with its field names); `dtype_bytes` defaults to its torch_dtype."""
        if dtype_bytes is None:
            dtype = str(getattr(cfg, "torch_dtype", "float32"))
            dtype_bytes = 2 if dtype in ("bfloat16", "float16", "half") else 4
        return cls(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.vocab_size, dtype_bytes, dtype_bytes)

    @property
    def layer_gemms(self) -> tuple[tuple[int, int], ...]:
        """(N, K) of each GEMM of one layer: fused qkv, o, fused gate/up, down."""
        h, i, qd, kvd = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        return ((qd + 2 * kvd, h), (h, qd), (2 * i, h), (h, i))

    @property
    def weight_bytes(self) -> int:
        """Every layer's linear weights plus the LM head (read once per iteration)."""
        per_layer = sum(n * k for n, k in self.layer_gemms)
        return (self.num_layers * per_layer + self.vocab_size * self.hidden_size) * self.param_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes

    @property
    def act_bytes_per_token(self) -> int:
        """Activation traffic of one token through the element-wise ops of every layer: two norms (read
        and write h), rope (q and k), the gated activation (read 2i, write i), two residual adds (read 2h,
        write h). GEMM inputs and outputs are left out: they stream while the GEMM computes."""
        h, i = self.hidden_size, self.intermediate_size
        qd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return self.num_layers * (4 * h + 2 * (qd + kvd) + 3 * i + 6 * h) * self.param_bytes

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs of one (query, key) pair over every layer and head: QK^T and PV."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


LLAMA2_7B = ModelShape(32, 4096, 11008, 32, 32, 128, 32000)          # the shape in vidur's H100 profile
LLAMA3_8B = ModelShape(32, 4096, 14336, 32, 8, 128, 128256)


@dataclass(frozen=True, slots=True)
class Coefficients:
    """The fitted part of the model for one phase. a1..a3 are measured time / ideal time."""

    overhead_ms: float     # a0: fixed per iteration (scheduling, launches, Python)
    linear: float          # a1: multiplies X_lin (1 / GEMM compute efficiency)
    attention: float       # a2: multiplies X_attn (1 / attention efficiency; causal masking halves it)
    memory: float          # a3: multiplies X_mem (1 / bandwidth efficiency)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.overhead_ms, self.linear, self.attention, self.memory)

    @property
    def compute_efficiency(self) -> float:
        return 1.0 / self.linear if self.linear > 0 else math.inf

    @property
    def memory_efficiency(self) -> float:
        return 1.0 / self.memory if self.memory > 0 else math.inf


def priors(kind: str, shape: ModelShape) -> dict[str, Coefficients]:
    """Starting coefficients per phase before any sample (see docs/performance-model.md for the sources).

    The overhead grows with the layer count: every layer is a dozen kernel launches (gpu) or torch op
    dispatches (cpu), each a few microseconds.
    """
    layers = shape.num_layers
    if kind == "gpu":
        # a1, a3: vidur's measured Llama-2-7B linear layers and element-wise ops on an H100, 1..4096
        # tokens, fitted against h100() (median error 5%). a2: causal masking computes half the pairs
        # counted, at ~350-400 of 800 TFLOP/s (a FlashAttention-2/Triton-class kernel).
        overhead = 0.5 + 0.075 * layers
        prefill = Coefficients(overhead, 1.0, 1.15, 1.05)
        decode = Coefficients(overhead, 1.0, 1.5, 1.05)      # paged-attention KV reads at ~2 of 3 TB/s
        colocated = Coefficients(overhead, 1.0, 1.3, 1.05)
    elif kind == "cpu":
        overhead = 1.0 + 0.15 * layers
        prefill = Coefficients(overhead, 1.0, 1.5, 1.2)
        decode = Coefficients(overhead, 1.0, 3.0, 1.2)       # paged KV gathered into a copy, then read
        colocated = Coefficients(overhead, 1.0, 2.0, 1.2)
    else:
        raise ValueError(f"kind must be 'cpu' or 'gpu', not {kind!r}")
    return {"prefill": prefill, "decode": decode, "colocated": colocated}


@dataclass(frozen=True, slots=True)
class ErrorStats:
    """Relative prediction error of one phase, each sample predicted before any fit that used it."""

    phase: str
    count: int             # samples in the window
    median: float          # median |predicted - measured| / measured
    p90: float             # 90th percentile of the same


class PerfModel:
    """The model of one backend and model, with its coefficients fitted online."""

    def __init__(self, device: DeviceSpec, shape: ModelShape,
                 coefficients: Mapping[str, Coefficients] | None = None, *,
                 history: int = 256, error_window: int = 256, min_samples: int = 8, ridge: float = 1e-3):
        if history < 4 or min_samples < 1 or error_window < 1 or ridge < 0:
            raise ValueError("history must be at least 4, min_samples and error_window at least 1, ridge >= 0")
        self.device = device
        self.units = device.unit_space          # share <-> units, the same conversion the controller sends
        self.shape = shape
        self.prior: dict[str, Coefficients] = {**priors(device.kind, shape), **(coefficients or {})}
        self.coefficients: dict[str, Coefficients] = dict(self.prior)
        self._coef = {phase: c.as_tuple() for phase, c in self.coefficients.items()}
        self.min_samples = min_samples
        self.ridge = ridge
        self._history = {p: collections.deque(maxlen=history) for p in PHASES}   # (Features, elapsed_ms)
        self._errors = {p: collections.deque(maxlen=error_window) for p in PHASES}
        self._new = dict.fromkeys(PHASES, 0)          # samples since the phase's last fit
        # Everything the features need, computed once.
        self._gemms = tuple((n, k, -(-n // device.tile_n)) for n, k in shape.layer_gemms)
        self._head = (shape.vocab_size, shape.hidden_size, -(-shape.vocab_size // device.tile_n))
        self._layer_weight_bytes = shape.num_layers * sum(n * k for n, k in shape.layer_gemms) * shape.param_bytes
        self._head_bytes = shape.vocab_size * shape.hidden_size * shape.param_bytes
        self._token_bytes = shape.act_bytes_per_token + shape.kv_bytes_per_token     # activations + KV write
        self._kv_per_token = shape.kv_bytes_per_token
        self._pair_flops = shape.attn_flops_per_pair
        self._ms_per_flop_unit = 1e3 / device.peak_flops_per_unit                   # ms per FLOP on one unit
        self._features = functools.lru_cache(maxsize=1 << 16)(self._compute_features)

    # ------------------------------------------------------------------ shares and units
    def units_for(self, share: float) -> int:
        """Whole units a share buys: rounded down to the granularity (a TPC on a GPU), at least one step."""
        return self.units.units_for(share)

    def compute_flops(self, units: int) -> float:
        """FLOP/s of `units` units without wave quantization."""
        return units * self.device.peak_flops_per_unit

    def bandwidth(self, units: int) -> float:
        """bytes/s at `units` units: B * min(1, s / s_sat)."""
        share = units / self.device.num_units
        return self.device.peak_mem_bw * min(1.0, share / self.device.bw_saturation_share)

    # ------------------------------------------------------------------ prediction
    def predict_prefill_ms(self, share: float, num_tokens: int, attention_work: int, num_requests: int = 1) -> float:
        """A prefill batch: `num_tokens` prompt tokens, `attention_work` = sum of query_len * context_len."""
        return self.predict_units_ms("prefill", self.units_for(share), num_tokens, attention_work, 0, 0, num_requests)

    def predict_decode_ms(self, share: float, batch_size: int, context_tokens: int) -> float:
        """A decode batch: `batch_size` rows of one token, `context_tokens` summed over the rows."""
        return self.predict_units_ms("decode", self.units_for(share), 0, 0, batch_size, context_tokens, batch_size)

    def predict_colocated_ms(self, share: float, num_prefill_tokens: int, attention_work: int, batch_size: int,
                             context_tokens: int, num_prefill_requests: int = 1) -> float:
        """A hybrid (chunked-prefill) batch of the colocated baseline."""
        return self.predict_units_ms("colocated", self.units_for(share), num_prefill_tokens, attention_work,
                                     batch_size, context_tokens, num_prefill_requests + batch_size)

    def predict_units_ms(self, phase: str, units: int, prefill_tokens: int, attention_work: int,
                         decode_rows: int, context_tokens: int, sampled_rows: int) -> float:
        a0, a1, a2, a3 = self._coef[phase]
        _, x_lin, x_attn, x_mem = self._features(units, prefill_tokens, attention_work, decode_rows,
                                                  context_tokens, sampled_rows)
        return a0 + a1 * x_lin + a2 * x_attn + a3 * x_mem

    def features(self, units: int, prefill_tokens: int, attention_work: int, decode_rows: int,
                 context_tokens: int, sampled_rows: int) -> Features:
        """(1, X_lin, X_attn, X_mem) in ms: what the coefficients multiply."""
        return self._features(units, prefill_tokens, attention_work, decode_rows, context_tokens, sampled_rows)

    def _compute_features(self, units: int, prefill_tokens: int, attention_work: int, decode_rows: int,
                          context_tokens: int, sampled_rows: int) -> Features:
        rows = prefill_tokens + decode_rows
        bw_ms = 1e3 / self.bandwidth(units)                        # ms per byte
        # GEMMs: tiles of tile_m x tile_n outputs, ceil(tiles / units) waves; a partial wave costs a full one.
        lin = 0.0
        if rows:
            lin = self.shape.num_layers * self._gemm_flop_units(rows, units, self._gemms)
        if sampled_rows:
            lin += self._gemm_flop_units(sampled_rows, units, (self._head,))
        x_lin = lin * self._ms_per_flop_unit
        # Attention, each part at its own roofline (not wave-quantized: per-chunk lengths are not known).
        # FLOPs: every (query, key) pair. Bytes: K/V re-read once per tile_m queries (FlashAttention's
        # I/O), which for a decode row (one query) is its whole context.
        compute_ms = self._ms_per_flop_unit / units
        x_attn = 0.0
        if attention_work:
            x_attn += max(self._pair_flops * attention_work * compute_ms,
                          self._kv_per_token * attention_work / self.device.tile_m * bw_ms)
        if decode_rows and context_tokens:
            x_attn += max(self._pair_flops * context_tokens * compute_ms, self._kv_per_token * context_tokens * bw_ms)
        # Bytes: weights once per iteration (the LM head only when something samples), activations, KV writes.
        nbytes = (self._layer_weight_bytes if rows else 0) + (self._head_bytes if sampled_rows else 0)
        x_mem = (nbytes + rows * self._token_bytes) * bw_ms
        return (1.0, x_lin, x_attn, x_mem)

    def _gemm_flop_units(self, rows: int, units: int, gemms: Iterable[tuple[int, int, int]]) -> float:
        """Sum over GEMMs of FLOPs / (units actually busy): unit-FLOPs, to be scaled by ms per FLOP."""
        row_tiles = -(-rows // self.device.tile_m)
        total = 0.0
        for n, k, col_tiles in gemms:
            tiles = row_tiles * col_tiles
            waves = -(-tiles // units)
            total += 2.0 * rows * n * k * waves / tiles
        return total

    # ------------------------------------------------------------------ calibration
    def sample_features(self, sample: "IterationSample") -> tuple[str, Features] | None:
        """The phase and features of a worker's report; None for an empty iteration or an unknown phase."""
        if sample.phase not in PHASES or sample.elapsed_ms <= 0:
            return None
        if sample.num_prefill_tokens + sample.num_decode_tokens <= 0:
            return None
        units = sample.num_units if sample.num_units > 0 else self.units_for(sample.share)
        units = min(units, self.device.num_units)
        sampled = sample.num_decode_tokens if sample.phase == "decode" else sample.num_requests
        return sample.phase, self._features(units, sample.num_prefill_tokens, sample.attention_work,
                                            sample.num_decode_tokens, sample.context_tokens, sampled)

    def observe(self, sample: "IterationSample") -> float | None:
        """Record one measured iteration; returns its relative error under the current coefficients.

        The error is honest: the sample is predicted before any fit that includes it.
        """
        found = self.sample_features(sample)
        if found is None:
            return None
        phase, x = found
        predicted = sum(a * f for a, f in zip(self._coef[phase], x))
        error = abs(predicted - sample.elapsed_ms) / sample.elapsed_ms
        self._errors[phase].append(error)
        self._history[phase].append((x, sample.elapsed_ms))
        self._new[phase] += 1
        return error

    def refit(self) -> list[str]:
        """Least squares over each phase's bounded history that has new samples; returns the phases refitted."""
        refitted = []
        for phase in PHASES:
            rows = self._history[phase]
            if self._new[phase] == 0 or len(rows) < self.min_samples:
                continue
            self.coefficients[phase] = fit_coefficients(rows, self.prior[phase], self.ridge)
            self._coef[phase] = self.coefficients[phase].as_tuple()
            self._new[phase] = 0
            refitted.append(phase)
        return refitted

    def set_coefficients(self, phase: str, coefficients: Coefficients) -> None:
        """Replace one phase's coefficients (a simulator calibrated elsewhere, a restored state)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {', '.join(PHASES)}")
        self.coefficients[phase] = coefficients
        self._coef[phase] = coefficients.as_tuple()

    def error_stats(self) -> dict[str, ErrorStats]:
        """Median and p90 relative error per phase over its recent samples (phases with none are left out)."""
        stats = {}
        for phase, errors in self._errors.items():
            if errors:
                ordered = sorted(errors)
                stats[phase] = ErrorStats(phase, len(ordered), _quantile(ordered, 0.5), _quantile(ordered, 0.9))
        return stats

    def num_samples(self, phase: str) -> int:
        return len(self._history[phase])


def fit_coefficients(rows: Iterable[tuple[Features, float]], prior: Coefficients, ridge: float = 1e-3) -> Coefficients:
    """Weighted least squares of t = x . a, regularized toward `prior`, with a >= 0.

    Weights 1/t^2 make it minimize relative error (timing noise is roughly proportional to the time, and
    a 2 ms decode step matters as much as a 200 ms prefill). The penalty on a_j is `ridge` times the
    j-th diagonal of X^T W X, so the prior decides only directions the data cannot (a share that never
    changes makes the overhead and the weight-read time collinear). While a coefficient comes out
    negative, the most negative one is fixed at 0 and the rest solved again (an active set that only
    grows: enough for four unknowns).
    """
    n = 4
    a = [[0.0] * n for _ in range(n)]
    b = [0.0] * n
    for x, t in rows:
        w = 1.0 / max(t, 1e-6) ** 2
        for i in range(n):
            wxi = w * x[i]
            if wxi == 0.0:
                continue
            b[i] += wxi * t
            row = a[i]
            for j in range(i, n):
                row[j] += wxi * x[j]
    for i in range(n):
        for j in range(i):
            a[i][j] = a[j][i]
    p = prior.as_tuple()
    for i in range(n):
        lam = ridge * a[i][i] if a[i][i] > 0 else 1.0     # a feature never seen: keep the prior
        a[i][i] += lam
        b[i] += lam * p[i]
    fixed: dict[int, float] = {}
    solution: dict[int, float] = {}
    for _ in range(n):
        free = [i for i in range(n) if i not in fixed]
        if not free:
            break
        sub = [[a[i][j] for j in free] for i in free]
        rhs = [b[i] - sum(a[i][j] * v for j, v in fixed.items()) for i in free]
        values = _solve_spd(sub, rhs)
        solution = dict(zip(free, values))
        worst = min(solution, key=lambda i: solution[i] * math.sqrt(a[i][i]))   # most negative, scaled
        if solution[worst] >= 0:
            break
        fixed[worst] = 0.0
    coef = [fixed.get(i, solution.get(i, 0.0)) for i in range(n)]
    return Coefficients(*(max(0.0, c) for c in coef))


def _solve_spd(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a small (symmetric positive definite) system: Jacobi scaling, then Gaussian elimination with
    partial pivoting."""
    n = len(b)
    scale = [1.0 / math.sqrt(a[i][i]) if a[i][i] > 0 else 1.0 for i in range(n)]
    m = [[a[i][j] * scale[i] * scale[j] for j in range(n)] + [b[i] * scale[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            raise ArithmeticError("singular least-squares system")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    y = [0.0] * n
    for r in range(n - 1, -1, -1):
        y[r] = (m[r][n] - sum(m[r][c] * y[c] for c in range(r + 1, n))) / m[r][r]
    return [y[i] * scale[i] for i in range(n)]


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks of an already sorted list."""
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
