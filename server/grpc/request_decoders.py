"""Inference requests decoded with their tensor bytes left where they arrived (see client/wire.py).

grpc hands a method's request deserializer the received bytes. For the inference methods that deserializer is
``wire.split``: protobuf parses everything but the tensor bytes, and each tensor's bytes stay a zero-copy view
of the received buffer, so a large request is not copied twice more (by the parse and by reading the field).
The servicers take what it returns, or a plain message (e.g. from Ray Serve's proxy), through ``unpack``; bytes
that are not a valid message are INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from leanserve.client.wire import Unpacked, split
from leanserve.server.errors import InvalidArgument
from leanserve.v1 import inference_service_pb2 as v1_pb
from leanserve.v2 import grpc_service_pb2 as v2_pb

_V1 = v1_pb.PredictRequest
_V1_INPUTS = _V1.DESCRIPTOR.fields_by_name["inputs"]
_V1_DATA = _V1_INPUTS.message_type.fields_by_name["data"].number
_V2 = v2_pb.ModelInferRequest
_V2_RAW = _V2.DESCRIPTOR.fields_by_name["raw_input_contents"].number


class Undecodable(NamedTuple):
    """Received bytes that are not a valid message of the method's request type: answered INVALID_ARGUMENT by the
    servicer (through ``unpack``) instead of the INTERNAL grpc gives when a deserializer fails; inside a stream
    that request gets its error answer and the stream goes on."""

    #: an empty message of the type, for error answers that echo the request's fields
    message: Any
    error: str


def _not_valid(data: bytes, cls: Any) -> str:
    return f"the request ({len(data)} bytes) is not a valid {cls.DESCRIPTOR.full_name}"


def _decoder(cls: Any, field: int, inner: int | None = None) -> Callable[[bytes], Unpacked | Undecodable]:
    def decode(data: bytes) -> Unpacked | Undecodable:
        try:
            return split(data, cls.FromString, field, inner)
        except DecodeError:
            return Undecodable(cls(), _not_valid(data, cls))

    return decode


def refusing(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A method's own request deserializer (``Message.FromString``) returning ``Undecodable`` for bytes that are not
    a message, where grpc would answer its exception with INTERNAL; see ``check``."""
    cls = getattr(parse, "__self__", None)

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            if cls is None:
                return Undecodable(None, f"the request ({len(data)} bytes) is not a valid message for this method")
            return Undecodable(cls(), _not_valid(data, cls))

    return decode


def check(request: Any) -> Any:
    """``request`` itself; InvalidArgument when ``refusing`` could not decode it."""
    if type(request) is Undecodable:
        raise InvalidArgument(request.error)
    return request


#: a leanserve.v1 PredictRequest; its tensors' ``data`` as views
predict_request = _decoder(_V1, _V1_INPUTS.number, _V1_DATA)
#: an Open Inference Protocol ModelInferRequest; its ``raw_input_contents`` as views
infer_request = _decoder(_V2, _V2_RAW)

#: full method name -> request deserializer, for the servicer wrapper (interceptors.ErrorInterceptor)
REQUEST_DECODERS: dict[str, Callable[[bytes], Unpacked | Undecodable]] = {
    "/leanserve.v1.InferenceService/Predict": predict_request,
    "/leanserve.v1.InferenceService/PredictStream": predict_request,
    "/inference.GRPCInferenceService/ModelInfer": infer_request,
    "/inference.GRPCInferenceService/ModelStreamInfer": infer_request,
}


def unpack(request: Any) -> tuple[Any, list[Any] | None]:
    """(message, tensor bytes taken out of it or None) of a request ``REQUEST_DECODERS`` decoded, or of a plain
    message; InvalidArgument for bytes that were not a valid message."""
    kind = type(request)
    if kind is Unpacked:
        return request.message, request.raws
    if kind is Undecodable:
        raise InvalidArgument(request.error)
    return request, None


def message_of(request: Any) -> Any:
    """The message of a decoded request (empty when it was undecodable), or the plain message itself."""
    return request.message if type(request) in (Unpacked, Undecodable) else request
