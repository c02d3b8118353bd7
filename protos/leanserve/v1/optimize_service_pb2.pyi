from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PruneGranularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PER_LAYER: _ClassVar[PruneGranularity]
    GLOBAL: _ClassVar[PruneGranularity]

class Quantization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_NONE: _ClassVar[Quantization]
    INT8_DYNAMIC: _ClassVar[Quantization]
PER_LAYER: PruneGranularity
GLOBAL: PruneGranularity
QUANTIZATION_NONE: Quantization
INT8_DYNAMIC: Quantization

class OptimizeOptions(_message.Message):
    __slots__ = ("model_name", "version", "target_sparsity", "block", "granularity", "quantization", "max_accuracy_drop", "epochs", "search", "promote", "data_size_bytes", "description", "time_budget_seconds")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_SPARSITY_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ACCURACY_DROP_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_FIELD_NUMBER: _ClassVar[int]
    DATA_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    target_sparsity: float
    block: str
    granularity: PruneGranularity
    quantization: Quantization
    max_accuracy_drop: float
    epochs: int
    search: bool
    promote: bool
    data_size_bytes: int
    description: str
    time_budget_seconds: float
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., target_sparsity: _Optional[float] = ..., block: _Optional[str] = ..., granularity: _Optional[_Union[PruneGranularity, str]] = ..., quantization: _Optional[_Union[Quantization, str]] = ..., max_accuracy_drop: _Optional[float] = ..., epochs: _Optional[int] = ..., search: bool = ..., promote: bool = ..., data_size_bytes: _Optional[int] = ..., description: _Optional[str] = ..., time_budget_seconds: _Optional[float] = ...) -> None: ...

class OptimizeRequest(_message.Message):
    __slots__ = ("options", "data_chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: OptimizeOptions
    data_chunk: bytes
    def __init__(self, options: _Optional[_Union[OptimizeOptions, _Mapping]] = ..., data_chunk: _Optional[bytes] = ...) -> None: ...

class OptimizeProgress(_message.Message):
    __slots__ = ("stage", "fraction", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    fraction: float
    message: str
    def __init__(self, stage: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class OptimizeReport(_message.Message):
    __slots__ = ("model_name", "version", "from_version", "within_budget", "promoted", "default_version", "metric", "metric_before", "metric_after", "size_bytes_before", "size_bytes_after", "report_json")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    WITHIN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METRIC_BEFORE_FIELD_NUMBER: _ClassVar[int]
    METRIC_AFTER_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    from_version: int
    within_budget: bool
    promoted: bool
    default_version: int
    metric: str
    metric_before: float
    metric_after: float
    size_bytes_before: int
    size_bytes_after: int
    report_json: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., from_version: _Optional[int] = ..., within_budget: bool = ..., promoted: bool = ..., default_version: _Optional[int] = ..., metric: _Optional[str] = ..., metric_before: _Optional[float] = ..., metric_after: _Optional[float] = ..., size_bytes_before: _Optional[int] = ..., size_bytes_after: _Optional[int] = ..., report_json: _Optional[str] = ...) -> None: ...

class OptimizeEvent(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: OptimizeProgress
    report: OptimizeReport
    def __init__(self, progress: _Optional[_Union[OptimizeProgress, _Mapping]] = ..., report: _Optional[_Union[OptimizeReport, _Mapping]] = ...) -> None: ...

class SetDefaultVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SetDefaultVersionResponse(_message.Message):
    __slots__ = ("default_version", "pinned")
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    default_version: int
    pinned: bool
    def __init__(self, default_version: _Optional[int] = ..., pinned: bool = ...) -> None: ...
