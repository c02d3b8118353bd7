"""leanserve.v1.OptimizeService: options and data in, progress events and one report out."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from leanserve.v1 import optimize_service_pb2 as pb
from leanserve.v1 import optimize_service_pb2_grpc as pb_grpc
from leanserve.server.errors import Cancelled, InvalidArgument
from leanserve.server.grpc import optimize_converters as conv
from leanserve.server.grpc.auth import caller_context
from leanserve.server.grpc.calls import Inbox, StreamSlots, data_chunks
from leanserve.server.optimize.service import Optimizer


class OptimizeServicer(pb_grpc.OptimizeServiceServicer):
    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        assert optimizer.settings.max_open_optimizations is not None  # filled in by Settings
        self.calls = StreamSlots(optimizer.settings.max_open_optimizations, "Optimize calls")

    def Optimize(self, request_iterator: Iterator[pb.OptimizeRequest],
                 context: grpc.ServicerContext) -> Iterator[pb.OptimizeEvent]:
        # a slot, an idle timeout and a minimum data rate: an idle or trickling caller holds neither a worker
        # thread nor the job slot for long
        settings = self.optimizer.settings
        with self.calls.hold():
            with Inbox(request_iterator, settings.stream_idle_timeout_seconds) as messages:
                first = next(messages, None)
                if first is None or first.WhichOneof("part") != "options":
                    raise InvalidArgument("an Optimize stream starts with an options message")
                chunks = data_chunks(messages, "data_chunk", settings.upload_min_bytes_per_second,
                                     settings.stream_idle_timeout_seconds, "optimization data",
                                     "after the options an Optimize stream carries only data chunks")
                job = self.optimizer.start(conv.optimize_options(first.options), chunks, caller_context(context))
            # runs when the call ends for any reason, e.g. the client cancelled; False = it ended already
            if not context.add_callback(job.cancel):
                job.cancel()
            for event in job.events():
                yield conv.optimize_event(event)
            if job.cancelled:
                raise Cancelled("optimization cancelled")

    def SetDefaultVersion(self, request: pb.SetDefaultVersionRequest,
                          context: grpc.ServicerContext) -> pb.SetDefaultVersionResponse:
        default, pinned = self.optimizer.set_default(request.name, request.version, caller_context(context))
        return pb.SetDefaultVersionResponse(default_version=default, pinned=pinned)
