"""leanserve.v1.InferenceService: unary and streaming predict over the dataplane."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from leanserve.v1 import inference_service_pb2 as pb
from leanserve.v1 import inference_service_pb2_grpc as pb_grpc
from server.dataplane import DataPlane
from server.errors import LeanserveError
from server.grpc import converters


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        inputs, kind, top_k = converters.predict_request(request)
        result = self.dp.predict(request.model_name, request.model_version, inputs, kind, top_k)
        return converters.predict_response(result, request.request_id)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        return self._predict(request)

    def PredictStream(
        self, request_iterator: Iterator[pb.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictResponse]:
        # gRPC's flow control bounds what is buffered: the next request is read only after this response is sent.
        for request in request_iterator:
            try:
                yield self._predict(request)
            except LeanserveError as exc:
                yield pb.PredictResponse(
                    model_name=request.model_name,
                    request_id=request.request_id,
                    error=pb.Error(code=exc.code.value[0], message=exc.message),
                )
