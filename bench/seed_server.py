"""The seed's way of serving, as a peer for bench/compare.py: Keras ``model.predict`` per request behind a plain
gRPC servicer (one thread pool), speaking the Open Inference Protocol so the same tritonclient load can hit it.

    .venv/bin/python bench/seed_server.py --model seed.h5 [--port 0] [--workers 16]

Prints ``listening on HOST:PORT`` once serving; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

import grpc  # noqa: E402

from leanserve.v2 import grpc_service_pb2 as pb  # noqa: E402
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


class SeedServicer(pb_grpc.GRPCInferenceServiceServicer):
    """One Keras model under one name; every request is one ``model.predict`` call, as the seed served it."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name
        self.input_name = model.inputs[0].name if hasattr(model.inputs[0], "name") else "input"
        self.output_name = "output"

    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=request.name == self.name)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="seed-keras", version="0")

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        if request.name != self.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.name, versions=["1"], platform="keras",
            inputs=[t(name=self.input_name, datatype="FP32", shape=[-1, *self.model.inputs[0].shape[1:]])],
            outputs=[t(name=self.output_name, datatype="FP32", shape=[-1, *self.model.outputs[0].shape[1:]])],
        )

    def ModelInfer(self, request: Any, context: Any) -> Any:
        if request.model_name != self.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        if len(request.inputs) != 1 or request.inputs[0].datatype != "FP32":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one FP32 input expected")
        spec = request.inputs[0]
        if request.raw_input_contents:
            x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(tuple(spec.shape))
        else:
            x = np.asarray(spec.contents.fp32_contents, dtype=np.float32).reshape(tuple(spec.shape))
        y = np.asarray(self.model.predict(x, verbose=0), dtype="<f4")
        out = pb.ModelInferResponse.InferOutputTensor(name=self.output_name, datatype="FP32", shape=y.shape)
        return pb.ModelInferResponse(
            model_name=self.name, model_version="1", id=request.id, outputs=[out], raw_output_contents=[y.tobytes()]
        )


def main(argv: list[str] | None = None) -> int:
    """Load the model, serve until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help=".h5 or .keras file")
    p.add_argument("--name", default="seed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=16, help="gRPC thread pool size")
    args = p.parse_args(argv)

    import keras

    model = keras.models.load_model(args.model, compile=False)
    model.predict(np.zeros((1, *model.inputs[0].shape[1:]), dtype=np.float32), verbose=0)  # build predict_function
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=opts)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(SeedServicer(model, args.name), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {args.host}:{port}", flush=True)
    stop.wait()
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
