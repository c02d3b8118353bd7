"""leanserve.v1.ModelService: protobuf in, dataplane call, protobuf out."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from leanserve.v1 import model_service_pb2 as pb
from leanserve.v1 import model_service_pb2_grpc as pb_grpc
from leanserve.server.dataplane import DataPlane
from leanserve.server.errors import InvalidArgument
from leanserve.server.grpc import converters


def _chunks(first: pb.UploadModelRequest | None, rest: Iterator[pb.UploadModelRequest]) -> Iterator[bytes]:
    for msg in rest:
        if msg.WhichOneof("part") != "chunk":
            raise InvalidArgument("after the header an upload carries only chunks")
        yield msg.chunk


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    def UploadModel(self, request_iterator: Iterator[pb.UploadModelRequest], context: grpc.ServicerContext):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("an upload starts with a header message")
        served = self.dp.upload(converters.upload_header(first.header), _chunks(first, request_iterator))
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
        return pb.DeleteModelResponse(deleted_versions=self.dp.delete_model(request.name, request.version))
