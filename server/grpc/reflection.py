"""gRPC server reflection (grpcurl, Postman, evans) under the same bounds as every other client stream here.

grpc-reflection's servicer reads its request stream on a stream-pool thread for as long as the client keeps it
open, with no limit and no timeout: enough idle reflection streams (open to anyone when no tokens are set) took
every stream thread, and predict streams, uploads and optimizations then hung instead of being refused. Here a
reflection stream holds one of ``max_open_reflection_streams`` slots (RESOURCE_EXHAUSTED past them) and ends
with DEADLINE_EXCEEDED after ``stream_idle_timeout_seconds`` without a request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from leanserve.server.grpc.calls import Inbox, StreamSlots

SERVICE_NAME = reflection.SERVICE_NAME


class BoundedReflectionServicer(reflection.ReflectionServicer):
    """grpc-reflection's answers, a slot and an idle timeout per stream."""

    def __init__(self, service_names: Iterable[str], max_streams: int, idle_timeout: float) -> None:
        super().__init__(tuple(service_names))
        self._slots = StreamSlots(max_streams, "reflection streams")
        self._idle = idle_timeout

    def ServerReflectionInfo(self, request_iterator: Iterator[reflection_pb2.ServerReflectionRequest],
                             context: grpc.ServicerContext) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        with self._slots.hold(), Inbox(request_iterator, self._idle) as requests:
            yield from super().ServerReflectionInfo(requests, context)


def add_reflection(server: grpc.Server, service_names: Iterable[str], max_streams: int, idle_timeout: float) -> None:
    """Serve reflection for ``service_names`` (and reflection itself) on ``server``."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        BoundedReflectionServicer((*service_names, SERVICE_NAME), max_streams, idle_timeout), server)
