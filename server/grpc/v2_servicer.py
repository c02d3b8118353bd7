"""inference.GRPCInferenceService (Open Inference Protocol / KServe V2) over the same dataplane as leanserve.v1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata

import grpc

from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc
from leanserve.server.dataplane import DataPlane, PendingPredict
from leanserve.server.errors import LeanserveError, NotFound, shown
from leanserve.server.grpc import v2_converters as conv
from leanserve.server.grpc.auth import caller_context
from leanserve.server.grpc.calls import StreamSlots, pipelined, request_context, status_code
from leanserve.server.grpc.request_decoders import message_of, unpack
from leanserve.server.serving.context import RequestContext

EXTENSIONS = ("model_repository", "statistics", "parameters")
#: ServerMetadata's extensions end with this prefix + the answering process's index (0 = the first process)
PROCESS_EXTENSION = "leanserve_process_index="


def _package_version() -> str:
    try:
        return metadata.version("leanserve")
    except metadata.PackageNotFoundError:
        return "0.0.0"


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, streams: StreamSlots) -> None:
        self.dp = dataplane
        self.streams = streams
        # the last entry names the process that answers (``--processes``: each connection goes to one of them)
        self._metadata = pb.ServerMetadataResponse(
            name="leanserve", version=_package_version(),
            extensions=(*EXTENSIONS, f"{PROCESS_EXTENSION}{dataplane.settings.process_index}"))

    # -- health and metadata ---------------------------------------------------------------------------------
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dp.ready)

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.dp.get_model(request.name, conv.parse_version(request.version))
        except NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.dp.ready)

    def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext):
        return self._metadata

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext):
        model = self.dp.get_model(request.name, conv.parse_version(request.version))
        return conv.model_metadata(model, self.dp.registry.versions(model.name))

    # -- inference -------------------------------------------------------------------------------------------
    def _submit(
        self, request: pb.ModelInferRequest, ctx: RequestContext, context: grpc.ServicerContext | None = None
    ) -> tuple[conv.InferCall, PendingPredict]:
        if type(request) is conv.InferCall:  # decoded by infer_memo's deserializer (unary ModelInfer)
            call = request
        else:
            request, raws = unpack(request)
            call = conv.infer_request(request, self.dp.settings.max_message_bytes, raws)
        if call.timeout_us:
            ctx = ctx.within(call.timeout_us / 1e6)
        pending = self.dp.submit(call.model_name, call.version, call.inputs, call.postprocess, call.top_k, ctx,
                                 call.outputs)
        if context is not None and not pending.done:
            # a cancelled RPC leaves the queue at once; False = it ended already, before the callback was in place
            if not context.add_callback(pending.cancel):
                pending.cancel()
        return call, pending

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse | bytes:
        call, pending = self._submit(request, request_context(context), context)
        if type(request) is conv.InferCall:  # came through grpc's deserializer: grpc's serializer takes bytes too
            return conv.infer_response_bytes(pending.result(), call)
        return conv.infer_response(pending.result(), call)

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        ctx = request_context(context)._replace(stream=True)

        def submit(request: pb.ModelInferRequest) -> tuple[Callable[[], pb.ModelStreamInferResponse], int]:
            call, pending = self._submit(request, ctx)
            final_flag = conv.wants_final_flag(message_of(request))

            def answer() -> pb.ModelStreamInferResponse:
                resp = pb.ModelStreamInferResponse()
                conv.fill_infer_response(resp.infer_response, pending.result(), call)
                if final_flag:
                    resp.infer_response.parameters[conv.FINAL_FLAG].bool_param = True
                return resp

            return answer, pending.output_bytes

        def on_error(request: pb.ModelInferRequest, exc: LeanserveError) -> pb.ModelStreamInferResponse:
            request = message_of(request)
            resp = pb.ModelStreamInferResponse(
                error_message=f"{status_code(exc).name}: {exc.message}",
                infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
            )
            if conv.wants_final_flag(request):
                resp.infer_response.parameters[conv.FINAL_FLAG].bool_param = True
            return resp

        settings = self.dp.settings
        with self.streams.hold():
            yield from pipelined(request_iterator, submit, on_error, settings.stream_window,
                                 settings.stream_idle_timeout_seconds, settings.stream_max_pending_bytes)

    def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext):
        if request.name:
            version = conv.parse_version(request.version)
            models = [self.dp.get_model(request.name, version)] if version else [
                self.dp.get_model(request.name, v) for v in self.dp.registry.versions(request.name)
            ]
            if not models:
                raise NotFound(f"model {shown(request.name)} not found")
        else:
            models = self.dp.registry.all()
        return pb.ModelStatisticsResponse(model_stats=[conv.model_statistics(m, m.stats.snapshot()) for m in models])

    # -- repository ------------------------------------------------------------------------------------------
    def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext):
        conv.check_repository_name(request.repository_name)
        return conv.repository_index(self.dp.repository_index(), request.ready)

    def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext):
        self.dp.load_model(conv.repository_load(request), caller_context(context))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext):
        self.dp.unload_model(conv.repository_unload(request), caller_context(context))
        return pb.RepositoryModelUnloadResponse()
