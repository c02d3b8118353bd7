from leanserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PostProcess(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RAW: _ClassVar[PostProcess]
    PROBABILITIES: _ClassVar[PostProcess]
    TOP_K: _ClassVar[PostProcess]
    ARGMAX: _ClassVar[PostProcess]
RAW: PostProcess
PROBABILITIES: PostProcess
TOP_K: PostProcess
ARGMAX: PostProcess

class PredictRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "inputs", "postprocess", "top_k", "request_id", "padding")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    postprocess: PostProcess
    top_k: int
    request_id: str
    padding: bytes
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., postprocess: _Optional[_Union[PostProcess, str]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., padding: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "request_id", "outputs", "error")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    request_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    error: Error
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., request_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
