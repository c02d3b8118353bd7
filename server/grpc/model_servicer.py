"""leanserve.v1.ModelService: protobuf in, dataplane call, protobuf out."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from leanserve.v1 import model_service_pb2 as pb
from leanserve.v1 import model_service_pb2_grpc as pb_grpc
from leanserve.server.dataplane import DataPlane
from leanserve.server.errors import InvalidArgument
from leanserve.server.grpc import converters
from leanserve.server.grpc.auth import caller_context
from leanserve.server.grpc.calls import Inbox, StreamSlots, data_chunks


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane
        assert dataplane.settings.max_open_uploads is not None  # filled in by Settings
        self.uploads = StreamSlots(dataplane.settings.max_open_uploads, "uploads")

    def UploadModel(self, request_iterator: Iterator[pb.UploadModelRequest], context: grpc.ServicerContext):
        # a slot, an idle timeout and a minimum rate: idle or trickling uploads must not hold every slot
        settings = self.dp.settings
        with self.uploads.hold(), Inbox(request_iterator, settings.stream_idle_timeout_seconds) as messages:
            first = next(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("an upload starts with a header message")
            chunks = data_chunks(messages, "chunk", settings.upload_min_bytes_per_second,
                                 settings.stream_idle_timeout_seconds, "upload",
                                 "after the header an upload carries only chunks")
            served = self.dp.upload(converters.upload_header(first.header), chunks, caller_context(context))
        return pb.UploadModelResponse(model=converters.model_info(self.dp.describe(served), served))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(name=name, versions=versions, latest_version=max(versions),
                                default_version=self.dp.registry.default_version(name))
                for name, versions in self.dp.list_models().items()
            ]
        )

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        served = self.dp.get_model(request.name, request.version)
        return converters.model_info(self.dp.describe(served), served)

    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext) -> pb.DeleteModelResponse:
        deleted = self.dp.delete_model(request.name, request.version, caller_context(context))
        return pb.DeleteModelResponse(deleted_versions=deleted)
