"""The physical floor for bench/compare.py: a bare grpcio Open Inference Protocol server that computes nothing.

ModelInfer answers every request with the same pre-built response (the right output name, shape and dtype, zeros),
so its throughput is what Python grpcio itself costs per request on this machine: no decoding, no validation, no
batching, no model. Health and metadata RPCs answer too, so tritonclient's readiness checks pass.

The streams are floors too: leanserve.v1 ``PredictStream`` and V2 ``ModelStreamInfer`` answer each request with zeros
of the right shape (rows from the request's shape, nothing decoded), so bench/serve.py can put one stream's
rows/s beside what grpcio alone moves. The floor runs with the malloc thresholds leanserve sets (its best setup for
large messages; ``--glibc-malloc`` leaves glibc's defaults).

``--model seed.npz`` makes it the floor of serving that model instead: ModelInfer reads the request's tensor
(``np.frombuffer``, no checks), runs the seed MLP through leanserve's own fused fp32 kernel and answers the result in
a new response: what a Python grpcio server that computes the model costs per request when it does nothing else (no
validation, batching, statistics or error handling). Its distance to the canned floor is the model's own share; its
distance to leanserve is what leanserve's serving layers cost.

``--aio`` serves the same answers from grpcio's asyncio server (``grpc.aio``: one event loop, no thread pool), the
other way a Python gRPC server can be built; bench/compare.py measures both kinds and keeps the faster as the floor.

    python bench/floor_server.py [--port 0] [--workers 4 | --aio] [--classes 10] [--model seed.npz] [--glibc-malloc]

Prints ``listening on HOST:PORT`` once serving; SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np

from leanserve.server.runtime.plan import LayerSpec, Plan, build_plan
from leanserve.server.runtime.process import tune_malloc
from leanserve.server.settings import Settings
from leanserve.v1 import inference_service_pb2 as v1_pb
from leanserve.v1 import inference_service_pb2_grpc as v1_grpc
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def zeros_response(rows: int, classes: int, **fields: Any) -> pb.ModelInferResponse:
    """A V2 answer of ``rows`` × ``classes`` FP32 zeros (the tensor's metadata is all tritonclient needs)."""
    resp = pb.ModelInferResponse(model_version="1", **fields)
    resp.outputs.add(name="output", datatype="FP32", shape=[rows, classes])
    resp.raw_output_contents.append(bytes(4 * rows * classes))
    return resp


def request_rows(req: Any) -> int:
    """Rows of a request as its first input's shape says (nothing decoded)."""
    return req.inputs[0].shape[0] if req.inputs and req.inputs[0].shape else 1


def v1_zeros(req: Any, classes: int) -> v1_pb.PredictResponse:
    """A leanserve.v1 answer of zeros shaped after the request."""
    rows = request_rows(req)
    resp = v1_pb.PredictResponse(model_name=req.model_name, model_version=1, request_id=req.request_id)
    out = resp.outputs.add(name="output", dtype=req.inputs[0].dtype if req.inputs else 1)
    out.shape[:] = [rows, classes]
    out.data = bytes(4 * rows * classes)
    return resp


class FloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with a canned response; nothing is read from the request."""

    def __init__(self, classes: int) -> None:
        self._response = zeros_response(1, classes, model_name="seed")
        self.classes = classes

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
            resp = zeros_response(request_rows(req), self.classes, model_name=req.model_name, id=req.id)
            yield pb.ModelStreamInferResponse(infer_response=resp)


def seed_plan(npz: str) -> Plan:
    """The seed MLP of bench/common.py (relu, relu, softmax) as leanserve's fp32 Plan: one fused kernel call."""
    with np.load(npz) as f:
        specs = [LayerSpec(f"dense{i}", f[f"w{i}"], f[f"b{i}"], act)
                 for i, act in enumerate(("relu", "relu", "softmax"))]
    return build_plan((specs[0].weights.shape[0],), specs)


class ModelFloorServicer(FloorServicer):
    """ModelInfer computes the model: the request's tensor in, the kernel's rows out, nothing else."""

    def __init__(self, classes: int, plan: Plan) -> None:
        super().__init__(classes)
        self._plan = plan

    def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        t = request.inputs[0]
        y = self._plan(np.frombuffer(request.raw_input_contents[0], np.float32).reshape(tuple(t.shape)))
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        resp.outputs.add(name="output", datatype="FP32", shape=y.shape)
        resp.raw_output_contents.append(y.tobytes())
        return resp


class FloorStreams(v1_grpc.InferenceServiceServicer):
    """leanserve.v1 PredictStream answered with zeros of the right shape; nothing is decoded."""

    def __init__(self, classes: int) -> None:
        self._classes = classes

    def PredictStream(self, requests: Iterator[Any], context: Any) -> Iterator[v1_pb.PredictResponse]:
        for req in requests:
            yield v1_zeros(req, self._classes)


class AioFloorServicer(pb_grpc.GRPCInferenceServiceServicer):
    """FloorServicer's answers from coroutines, for ``grpc.aio``."""

    def __init__(self, sync: FloorServicer) -> None:
        self._sync = sync

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return self._sync.ServerLive(request, context)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return self._sync.ServerReady(request, context)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return self._sync.ModelReady(request, context)

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return self._sync.ModelInfer(request, context)

    async def ModelStreamInfer(self, requests: AsyncIterator[Any],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for req in requests:
            resp = zeros_response(request_rows(req), self._sync.classes, model_name=req.model_name, id=req.id)
            yield pb.ModelStreamInferResponse(infer_response=resp)


class AioFloorStreams(v1_grpc.InferenceServiceServicer):
    """FloorStreams for ``grpc.aio``."""

    def __init__(self, classes: int) -> None:
        self._classes = classes

    async def PredictStream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[v1_pb.PredictResponse]:
        async for req in requests:
            yield v1_zeros(req, self._classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="gRPC worker threads (few threads = fewer GIL convoys)")
    p.add_argument("--aio", action="store_true", help="grpcio's asyncio server instead of the thread-pool one")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--model", help="the seed MLP's .npz (bench/common.py): compute it instead of a canned answer")
    p.add_argument("--glibc-malloc", action="store_true", help="keep glibc's malloc thresholds (not leanserve's)")
    args = p.parse_args()
    servicer = FloorServicer(args.classes) if args.model is None else ModelFloorServicer(args.classes,
                                                                                          seed_plan(args.model))
    if not args.glibc_malloc:
        settings = Settings()
        tune_malloc(settings.malloc_trim_threshold_bytes, settings.malloc_mmap_threshold_bytes)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if args.aio:
        asyncio.run(serve_aio(args.host, args.port, servicer, options))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    v1_grpc.add_InferenceServiceServicer_to_server(FloorStreams(args.classes), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    print(f"listening on {args.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


async def serve_aio(host: str, port: int, servicer: FloorServicer, options: list[tuple[str, int]]) -> None:
    """The same floor on ``grpc.aio`` until SIGTERM/SIGINT."""
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(AioFloorServicer(servicer), server)
    v1_grpc.add_InferenceServiceServicer_to_server(AioFloorStreams(servicer.classes), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    main()
