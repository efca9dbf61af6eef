from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SLO(_message.Message):
    __slots__ = ("ttft_ms", "tpot_ms", "percentile", "prefer")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    PREFER_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    tpot_ms: float
    percentile: float
    prefer: str
    def __init__(self, ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., percentile: _Optional[float] = ..., prefer: _Optional[str] = ...) -> None: ...

class Shares(_message.Message):
    __slots__ = ("prefill", "decode", "token_budget", "prefill_units", "decode_units")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PREFILL_UNITS_FIELD_NUMBER: _ClassVar[int]
    DECODE_UNITS_FIELD_NUMBER: _ClassVar[int]
    prefill: float
    decode: float
    token_budget: int
    prefill_units: int
    decode_units: int
    def __init__(self, prefill: _Optional[float] = ..., decode: _Optional[float] = ..., token_budget: _Optional[int] = ..., prefill_units: _Optional[int] = ..., decode_units: _Optional[int] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: str
    def __init__(self, mode: _Optional[str] = ...) -> None: ...

class PolicyState(_message.Message):
    __slots__ = ("mode", "shares")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    mode: str
    shares: Shares
    def __init__(self, mode: _Optional[str] = ..., shares: _Optional[_Union[Shares, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("phase", "worker_id", "target", "share", "cpu_ids", "token_budget", "num_running", "num_waiting", "iterations", "age_s", "measured_units", "units_total", "units_kind", "host_ms", "prefix_caching", "prefix_query_tokens", "prefix_hit_tokens")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CPU_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNITS_KIND_FIELD_NUMBER: _ClassVar[int]
    HOST_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    worker_id: str
    target: str
    share: float
    cpu_ids: _containers.RepeatedScalarFieldContainer[int]
    token_budget: int
    num_running: int
    num_waiting: int
    iterations: int
    age_s: float
    measured_units: int
    units_total: int
    units_kind: str
    host_ms: float
    prefix_caching: bool
    prefix_query_tokens: int
    prefix_hit_tokens: int
    def __init__(self, phase: _Optional[str] = ..., worker_id: _Optional[str] = ..., target: _Optional[str] = ..., share: _Optional[float] = ..., cpu_ids: _Optional[_Iterable[int]] = ..., token_budget: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., iterations: _Optional[int] = ..., age_s: _Optional[float] = ..., measured_units: _Optional[int] = ..., units_total: _Optional[int] = ..., units_kind: _Optional[str] = ..., host_ms: _Optional[float] = ..., prefix_caching: _Optional[bool] = ..., prefix_query_tokens: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ...) -> None: ...

class LatencyStats(_message.Message):
    __slots__ = ("p50_ms", "p90_ms", "p99_ms", "target_ms", "attainment", "num_samples")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MS_FIELD_NUMBER: _ClassVar[int]
    ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    target_ms: float
    attainment: float
    num_samples: int
    def __init__(self, p50_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., target_ms: _Optional[float] = ..., attainment: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...

class StackStatus(_message.Message):
    __slots__ = ("workers", "slo", "policy", "queue_waiting", "kv_blocks_free", "kv_blocks_total", "ttft", "tpot", "model_fit", "at_risk", "last_reason", "kv_blocks_cached", "kv_blocks_evictable", "queue_prompt_tokens", "queue_uncached_tokens")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TTFT_FIELD_NUMBER: _ClassVar[int]
    TPOT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIT_FIELD_NUMBER: _ClassVar[int]
    AT_RISK_FIELD_NUMBER: _ClassVar[int]
    LAST_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_EVICTABLE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    slo: SLO
    policy: PolicyState
    queue_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    ttft: LatencyStats
    tpot: LatencyStats
    model_fit: ModelFit
    at_risk: str
    last_reason: str
    kv_blocks_cached: int
    kv_blocks_evictable: int
    queue_prompt_tokens: int
    queue_uncached_tokens: int
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., slo: _Optional[_Union[SLO, _Mapping]] = ..., policy: _Optional[_Union[PolicyState, _Mapping]] = ..., queue_waiting: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., ttft: _Optional[_Union[LatencyStats, _Mapping]] = ..., tpot: _Optional[_Union[LatencyStats, _Mapping]] = ..., model_fit: _Optional[_Union[ModelFit, _Mapping]] = ..., at_risk: _Optional[str] = ..., last_reason: _Optional[str] = ..., kv_blocks_cached: _Optional[int] = ..., kv_blocks_evictable: _Optional[int] = ..., queue_prompt_tokens: _Optional[int] = ..., queue_uncached_tokens: _Optional[int] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("time_unix", "shares", "changed", "reason", "at_risk", "predicted_ttft_ms", "predicted_tpot_ms", "mode")
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_RISK_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    time_unix: float
    shares: Shares
    changed: bool
    reason: str
    at_risk: str
    predicted_ttft_ms: float
    predicted_tpot_ms: float
    mode: str
    def __init__(self, time_unix: _Optional[float] = ..., shares: _Optional[_Union[Shares, _Mapping]] = ..., changed: _Optional[bool] = ..., reason: _Optional[str] = ..., at_risk: _Optional[str] = ..., predicted_ttft_ms: _Optional[float] = ..., predicted_tpot_ms: _Optional[float] = ..., mode: _Optional[str] = ...) -> None: ...

class History(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...

class GetModelFitRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PhaseFit(_message.Message):
    __slots__ = ("phase", "coefficients", "median_rel_error", "p90_rel_error", "num_samples")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    P90_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    phase: str
    coefficients: _containers.RepeatedCompositeFieldContainer[Coefficient]
    median_rel_error: float
    p90_rel_error: float
    num_samples: int
    def __init__(self, phase: _Optional[str] = ..., coefficients: _Optional[_Iterable[_Union[Coefficient, _Mapping]]] = ..., median_rel_error: _Optional[float] = ..., p90_rel_error: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...

class Coefficient(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class ModelFit(_message.Message):
    __slots__ = ("backend", "phases", "unit", "num_units")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    NUM_UNITS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    phases: _containers.RepeatedCompositeFieldContainer[PhaseFit]
    unit: str
    num_units: int
    def __init__(self, backend: _Optional[str] = ..., phases: _Optional[_Iterable[_Union[PhaseFit, _Mapping]]] = ..., unit: _Optional[str] = ..., num_units: _Optional[int] = ...) -> None: ...
