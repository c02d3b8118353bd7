"""Inference requests decoded with their tensor bytes left where they arrived (see client/wire.py).

grpc hands a method's request deserializer the received bytes. For the inference methods that deserializer is
``wire.split``: protobuf parses everything but the tensor bytes, and each tensor's bytes stay a zero-copy view
of the received buffer, so a large request is not copied twice more (by the parse and by reading the field).
The servicers take what it returns, or a plain message (e.g. from Ray Serve's proxy), through ``unpack``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from leanserve.client.wire import Unpacked, split
from leanserve.v1 import inference_service_pb2 as v1_pb
from leanserve.v2 import grpc_service_pb2 as v2_pb

_V1 = v1_pb.PredictRequest
_V1_INPUTS = _V1.DESCRIPTOR.fields_by_name["inputs"]
_V1_DATA = _V1_INPUTS.message_type.fields_by_name["data"].number
_V2 = v2_pb.ModelInferRequest
_V2_RAW = _V2.DESCRIPTOR.fields_by_name["raw_input_contents"].number


def predict_request(data: bytes) -> Unpacked:
    """A leanserve.v1 PredictRequest; its tensors' ``data`` as views."""
    return split(data, _V1.FromString, _V1_INPUTS.number, _V1_DATA)


def infer_request(data: bytes) -> Unpacked:
    """An Open Inference Protocol ModelInferRequest; its ``raw_input_contents`` as views."""
    return split(data, _V2.FromString, _V2_RAW)


#: full method name -> request deserializer, for the servicer wrapper (interceptors.ErrorInterceptor)
REQUEST_DECODERS: dict[str, Callable[[bytes], Unpacked]] = {
    "/leanserve.v1.InferenceService/Predict": predict_request,
    "/leanserve.v1.InferenceService/PredictStream": predict_request,
    "/inference.GRPCInferenceService/ModelInfer": infer_request,
    "/inference.GRPCInferenceService/ModelStreamInfer": infer_request,
}


def unpack(request: Any) -> tuple[Any, list[Any] | None]:
    """(message, tensor bytes taken out of it or None) of a request ``REQUEST_DECODERS`` decoded, or of a plain
    message."""
    if type(request) is Unpacked:
        return request.message, request.raws
    return request, None
