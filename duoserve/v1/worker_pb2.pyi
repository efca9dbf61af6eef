from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PREFILL: _ClassVar[Phase]
    PHASE_DECODE: _ClassVar[Phase]
    PHASE_COLOCATED: _ClassVar[Phase]

class ShareStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_STATUS_UNSPECIFIED: _ClassVar[ShareStatus]
    SHARE_STATUS_APPLIED: _ClassVar[ShareStatus]
    SHARE_STATUS_ACCEPTED: _ClassVar[ShareStatus]
    SHARE_STATUS_RETUNING: _ClassVar[ShareStatus]
    SHARE_STATUS_QUEUED: _ClassVar[ShareStatus]
PHASE_UNSPECIFIED: Phase
PHASE_PREFILL: Phase
PHASE_DECODE: Phase
PHASE_COLOCATED: Phase
SHARE_STATUS_UNSPECIFIED: ShareStatus
SHARE_STATUS_APPLIED: ShareStatus
SHARE_STATUS_ACCEPTED: ShareStatus
SHARE_STATUS_RETUNING: ShareStatus
SHARE_STATUS_QUEUED: ShareStatus

class SetComputeShareRequest(_message.Message):
    __slots__ = ("share", "cpu_ids", "token_budget", "num_units")
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CPU_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    NUM_UNITS_FIELD_NUMBER: _ClassVar[int]
    share: float
    cpu_ids: _containers.RepeatedScalarFieldContainer[int]
    token_budget: int
    num_units: int
    def __init__(self, share: _Optional[float] = ..., cpu_ids: _Optional[_Iterable[int]] = ..., token_budget: _Optional[int] = ..., num_units: _Optional[int] = ...) -> None: ...

class ComputeShare(_message.Message):
    __slots__ = ("share", "cpu_ids", "token_budget", "applied_at_iteration", "pending", "applied_at_unix_ms", "status", "changed_at_unix_ms", "num_units")
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CPU_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_ITERATION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_UNITS_FIELD_NUMBER: _ClassVar[int]
    share: float
    cpu_ids: _containers.RepeatedScalarFieldContainer[int]
    token_budget: int
    applied_at_iteration: int
    pending: bool
    applied_at_unix_ms: int
    status: ShareStatus
    changed_at_unix_ms: int
    num_units: int
    def __init__(self, share: _Optional[float] = ..., cpu_ids: _Optional[_Iterable[int]] = ..., token_budget: _Optional[int] = ..., applied_at_iteration: _Optional[int] = ..., pending: _Optional[bool] = ..., applied_at_unix_ms: _Optional[int] = ..., status: _Optional[_Union[ShareStatus, str]] = ..., changed_at_unix_ms: _Optional[int] = ..., num_units: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("phase", "worker_id", "share", "num_running", "num_waiting", "iterations", "tokens_processed", "requests_finished", "preemptions", "last_iteration_ms", "last_batch_tokens", "kv_blocks_free", "kv_blocks_total", "draining", "units")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ITERATION_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    worker_id: str
    share: ComputeShare
    num_running: int
    num_waiting: int
    iterations: int
    tokens_processed: int
    requests_finished: int
    preemptions: int
    last_iteration_ms: float
    last_batch_tokens: int
    kv_blocks_free: int
    kv_blocks_total: int
    draining: bool
    units: ComputeUnits
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., worker_id: _Optional[str] = ..., share: _Optional[_Union[ComputeShare, _Mapping]] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., iterations: _Optional[int] = ..., tokens_processed: _Optional[int] = ..., requests_finished: _Optional[int] = ..., preemptions: _Optional[int] = ..., last_iteration_ms: _Optional[float] = ..., last_batch_tokens: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., draining: _Optional[bool] = ..., units: _Optional[_Union[ComputeUnits, _Mapping]] = ...) -> None: ...

class ComputeUnits(_message.Message):
    __slots__ = ("kind", "used", "total", "error")
    KIND_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    kind: str
    used: int
    total: int
    error: str
    def __init__(self, kind: _Optional[str] = ..., used: _Optional[int] = ..., total: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("wait",)
    WAIT_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    def __init__(self, wait: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("drained", "num_running", "num_waiting")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    num_running: int
    num_waiting: int
    def __init__(self, drained: _Optional[bool] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ...) -> None: ...
