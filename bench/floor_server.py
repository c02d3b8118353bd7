"""The physical floor for bench/compare.py: a bare grpcio Open Inference Protocol server that computes nothing.

ModelInfer answers every request with the same pre-built response (the right output name, shape and dtype, zeros),
so its throughput is what Python grpcio itself costs per request on this machine: no decoding, no validation, no
batching, no model. Health and metadata RPCs answer too, so tritonclient's readiness checks pass.

    python bench/floor_server.py [--port 0] [--workers 4] [--classes 10]

Prints ``listening on HOST:PORT`` once serving; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from typing import Any

import grpc

from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with a canned response; nothing is read from the request."""

    def __init__(self, classes: int) -> None:
        self._response = pb.ModelInferResponse(model_name="seed", model_version="1")
        out = self._response.outputs.add(name="output", datatype="FP32", shape=[1, classes])
        del out  # the tensor's metadata is all tritonclient needs beside the raw bytes
        self._response.raw_output_contents.append(bytes(4 * classes))

    def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return self._response


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="gRPC worker threads (few threads = fewer GIL convoys)")
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args()
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(args.classes), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"listening on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


if __name__ == "__main__":
    main()
