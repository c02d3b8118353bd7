"""The clients send calls that change nothing again when the answer is UNAVAILABLE (a reset connection, e.g. a
server process being restarted), and never calls that change something. The server here is a real grpc server
whose handlers answer UNAVAILABLE a given number of times and count every call they receive."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from leanserve.client import AsyncClient, Client
from leanserve.v1 import inference_service_pb2 as inf_pb
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import tensor_pb2 as tensor_pb


class Flaky:
    """``/service/method`` -> UNAVAILABLE for the first ``failures`` calls, then ``answer``."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()
        self.answers = {
            "/leanserve.v1.InferenceService/Predict": inf_pb.PredictResponse(
                model_name="m", model_version=1,
                outputs=[tensor_pb.Tensor(name="y", dtype=tensor_pb.FLOAT32, shape=[1, 1], data=bytes(4))]),
            "/leanserve.v1.ModelService/ListModels": model_pb.ListModelsResponse(),
            "/leanserve.v1.ModelService/DeleteModel": model_pb.DeleteModelResponse(),
        }

    def handler(self, method: str) -> grpc.RpcMethodHandler | None:
        if method not in self.answers:
            return None

        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls[method] += 1
            if self.calls[method] <= self.failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (test)")
            return self.answers[method].SerializeToString()

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture
def flaky() -> Iterator[tuple[Flaky, str]]:
    state = Flaky(failures=2)

    class Handlers(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return state.handler(details.method)

    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[Handlers()],
                         options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield state, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_reads_are_retried_on_unavailable(flaky: tuple[Flaky, str]) -> None:
    state, target = flaky
    with Client(target, timeout=30) as c:
        assert c.models() == {}
        assert c.predict("m", np.zeros((1, 1), np.float32)).output.shape == (1, 1)
    assert state.calls["/leanserve.v1.ModelService/ListModels"] == 3  # two UNAVAILABLE, then the answer
    assert state.calls["/leanserve.v1.InferenceService/Predict"] == 3


def test_large_requests_are_retried_too(flaky: tuple[Flaky, str]) -> None:
    # gRPC keeps only 256 KiB of a request for resending unless told otherwise: 8 MB here
    state, target = flaky
    with Client(target, timeout=30) as c:
        assert c.predict("m", np.zeros((1, 2_000_000), np.float32)).output.shape == (1, 1)
    assert state.calls["/leanserve.v1.InferenceService/Predict"] == 3


def test_changes_are_not_retried(flaky: tuple[Flaky, str]) -> None:
    state, target = flaky
    with Client(target, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.delete("m")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert state.calls["/leanserve.v1.ModelService/DeleteModel"] == 1


def test_the_async_client_has_the_same_policy(flaky: tuple[Flaky, str]) -> None:
    state, target = flaky

    async def scenario() -> None:
        async with AsyncClient(target, timeout=30) as c:
            assert await c.models() == {}
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.delete("m")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())
    assert state.calls["/leanserve.v1.ModelService/ListModels"] == 3
    assert state.calls["/leanserve.v1.ModelService/DeleteModel"] == 1


def test_retries_stop_after_three_attempts(flaky: tuple[Flaky, str]) -> None:
    state, target = flaky
    state.failures = 10
    with Client(target, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.models()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert state.calls["/leanserve.v1.ModelService/ListModels"] == 3
