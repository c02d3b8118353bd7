"""The physical floor for bench/compare.py: a bare grpcio Open Inference Protocol server that computes nothing.

ModelInfer answers every request with the same pre-built response (the right output name, shape and dtype, zeros),
so its throughput is what Python grpcio itself costs per request on this machine: no decoding, no validation, no
batching, no model. Health and metadata RPCs answer too, so tritonclient's readiness checks pass.

The streams are floors too: leanserve.v1 ``PredictStream`` and V2 ``ModelStreamInfer`` answer each request with zeros
of the right shape (rows from the request's shape, nothing decoded), so bench/serve.py can put one stream's
rows/s beside what grpcio alone moves. The floor runs with the malloc thresholds leanserve sets (its best setup for
large messages; ``--glibc-malloc`` leaves glibc's defaults).

    python bench/floor_server.py [--port 0] [--workers 4] [--classes 10] [--glibc-malloc]

Prints ``listening on HOST:PORT`` once serving; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from leanserve.server.runtime.process import tune_malloc
from leanserve.server.settings import Settings
from leanserve.v1 import inference_service_pb2 as v1_pb
from leanserve.v1 import inference_service_pb2_grpc as v1_grpc
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
        self._classes = classes

    def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return self._response

    def ModelStreamInfer(self, requests: Iterator[Any], context: Any) -> Iterator[pb.ModelStreamInferResponse]:
        for req in requests:
            rows = req.inputs[0].shape[0] if req.inputs and req.inputs[0].shape else 1
            resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
            resp.outputs.add(name="output", datatype="FP32", shape=[rows, self._classes])
            resp.raw_output_contents.append(bytes(4 * rows * self._classes))
            yield pb.ModelStreamInferResponse(infer_response=resp)


class FloorStreams(v1_grpc.InferenceServiceServicer):
    """leanserve.v1 PredictStream answered with zeros of the right shape; nothing is decoded."""

    def __init__(self, classes: int) -> None:
        self._classes = classes

    def PredictStream(self, requests: Iterator[Any], context: Any) -> Iterator[v1_pb.PredictResponse]:
        for req in requests:
            rows = req.inputs[0].shape[0] if req.inputs and req.inputs[0].shape else 1
            resp = v1_pb.PredictResponse(model_name=req.model_name, model_version=1, request_id=req.request_id)
            out = resp.outputs.add(name="output", dtype=req.inputs[0].dtype if req.inputs else 1)
            out.shape[:] = [rows, self._classes]
            out.data = bytes(4 * rows * self._classes)
            yield resp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="gRPC worker threads (few threads = fewer GIL convoys)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--glibc-malloc", action="store_true", help="keep glibc's malloc thresholds (not leanserve's)")
    args = p.parse_args()
    if not args.glibc_malloc:
        settings = Settings()
        tune_malloc(settings.malloc_trim_threshold_bytes, settings.malloc_mmap_threshold_bytes)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(args.classes), server)
    v1_grpc.add_InferenceServiceServicer_to_server(FloorStreams(args.classes), server)
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
