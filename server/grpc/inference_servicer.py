"""leanserve.v1.InferenceService: unary and streaming predict over the dataplane."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from leanserve.v1 import inference_service_pb2 as pb
from leanserve.v1 import inference_service_pb2_grpc as pb_grpc
from leanserve.server.dataplane import DataPlane
from leanserve.server.errors import LeanserveError
from leanserve.server.grpc import converters
from leanserve.server.grpc.calls import StreamSlots, pipelined, request_context, status_number
from leanserve.server.grpc.request_decoders import message_of, unpack
from leanserve.server.serving.context import RequestContext


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, streams: StreamSlots) -> None:
        self.dp = dataplane
        self.streams = streams

    def _submit(
        self, request: pb.PredictRequest, ctx: RequestContext, call: grpc.ServicerContext | None = None
    ) -> tuple[Callable[[], pb.PredictResponse], int]:
        """The request queued: a function waiting for its answer, and the bytes of the model's output it holds."""
        request, raws = unpack(request)
        inputs, kind, top_k = converters.predict_request(request, raws)
        pending = self.dp.submit(request.model_name, request.model_version, inputs, kind, top_k, ctx)
        if call is not None and not pending.done:
            # a cancelled RPC leaves the queue at once; False = it ended already, before the callback was in place
            if not call.add_callback(pending.cancel):
                pending.cancel()
        return lambda: converters.predict_response(pending.result(), request.request_id), pending.output_bytes

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        return self._submit(request, request_context(context), context)[0]()

    def PredictStream(
        self, request_iterator: Iterator[pb.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictResponse]:
        ctx = request_context(context)._replace(stream=True)

        def on_error(request: pb.PredictRequest, exc: LeanserveError) -> pb.PredictResponse:
            request = message_of(request)
            return pb.PredictResponse(
                model_name=request.model_name,
                request_id=request.request_id,
                error=pb.Error(code=status_number(exc), message=exc.message),
            )

        settings = self.dp.settings
        with self.streams.hold():
            yield from pipelined(request_iterator, lambda r: self._submit(r, ctx), on_error, settings.stream_window,
                                 settings.stream_idle_timeout_seconds, settings.stream_max_pending_bytes)
