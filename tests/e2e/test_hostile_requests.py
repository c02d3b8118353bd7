"""Requests built to hurt the server get a client-error status, cheaply, and take nothing from other callers.

Each case here was once answered INTERNAL, answered wrongly, or held a resource: a v1 tensor of thousands of huge
dimensions (its element count was multiplied out before the dimensions were counted, quadratic in their number
and under the GIL), a 0-d tensor for a model taking one scalar per row (an IndexError in validation), bytes that
are not a message sent to any method but the inference ones (grpc's own "Exception deserializing request!"), a
stream whose client never reads its answers (its handler thread and stream slot held for as long as the
connection lived), and V2 options sent in a form the server used to ignore (a top_k given as a string, requested
output options such as Triton's classification, an output requested twice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.server.app import ServerHandle, create_server
from leanserve.server.serving.model import ServedModel, TensorSignature
from leanserve.v1 import inference_service_pb2 as v1
from leanserve.v1 import inference_service_pb2_grpc as v1_grpc
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import tensor_pb2 as tensor_pb
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.conftest import make_settings
from tests.toy import toy_model, wait_until

IDLE_SECONDS = 1.0


@pytest.fixture
def served(repo_dir: Path) -> Iterator[tuple[ServerHandle, Client]]:
    """One stream slot and a short idle timeout; ``ok`` (y = 2x, 4 features) and ``scalar`` (one float per row)."""
    handle = create_server(make_settings(repo_dir, max_open_streams=1, stream_idle_timeout_seconds=IDLE_SECONDS))
    handle.dataplane.serve(toy_model(lambda x: x * 2, name="ok", features=4))
    handle.dataplane.serve(ServedModel(
        name="scalar", version=1, runtime="plan", input=TensorSignature("s", "float32", ()),
        output=TensorSignature("y", "float32", ()), manifest={}, runner=lambda x: x + 1,
    ))
    with Client(f"127.0.0.1:{handle.port}", timeout=60) as client:
        yield handle, client
    handle.stop(0.5)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _v2_request(model: str, shape: list[int], data: bytes, **kw) -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name=model, inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)],
        raw_input_contents=[data], **kw)


def test_a_tensor_of_thousands_of_huge_dimensions_is_refused_by_counting_them(served) -> None:
    _, client = served
    stub = v1_grpc.InferenceServiceStub(client.channel)
    for dims in (250, 30_000):  # 250: its byte count has thousands of digits; 30,000 took seconds to multiply
        tensor = tensor_pb.Tensor(name="x", dtype=tensor_pb.FLOAT32, shape=[2**62] * dims, data=bytes(4))
        code, message = _code(lambda: stub.Predict(v1.PredictRequest(model_name="ok", inputs=[tensor]), timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{dims} dimensions" in message, message
        answers = list(stub.PredictStream(iter([v1.PredictRequest(model_name="ok", inputs=[tensor])]), timeout=60))
        assert answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    v2_stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
    code, message = _code(lambda: v2_stub.ModelInfer(_v2_request("ok", [2**62] * 30_000, bytes(4)), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "30000 dimensions" in message
    np.testing.assert_array_equal(client.predict("ok", np.ones((1, 4), np.float32)).output, 2)


def test_a_0d_tensor_for_a_scalar_model_is_invalid_not_internal(served) -> None:
    _, client = served
    one = np.float32(1).tobytes()
    v2_stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
    request = v2.ModelInferRequest(
        model_name="scalar", inputs=[v2.ModelInferRequest.InferInputTensor(name="s", datatype="FP32", shape=[])],
        raw_input_contents=[one])
    code, message = _code(lambda: v2_stub.ModelInfer(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch" in message, message
    tensor = tensor_pb.Tensor(name="s", dtype=tensor_pb.FLOAT32, shape=[], data=one)
    stub = v1_grpc.InferenceServiceStub(client.channel)
    code, _ = _code(lambda: stub.Predict(v1.PredictRequest(model_name="scalar", inputs=[tensor]), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # a batch of scalars is the model's signature: served
    np.testing.assert_array_equal(client.predict("scalar", np.array([1, 2], np.float32)).output, [2, 3])


@pytest.mark.parametrize("method", [
    "/inference.GRPCInferenceService/ModelMetadata", "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelStatistics", "/leanserve.v1.ModelService/GetModel",
])
def test_bytes_that_are_no_message_are_invalid_argument_on_every_method(served, method: str) -> None:
    _, client = served
    call = client.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    for garbage in (b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\xff\xff\xff"):
        code, message = _code(lambda: call(garbage, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in message, (garbage, code, message)


def test_an_upload_stream_with_an_undecodable_message_is_invalid_argument(served) -> None:
    _, client = served
    upload = client.channel.stream_unary("/leanserve.v1.ModelService/UploadModel", request_serializer=None,
                                         response_deserializer=None)
    header = model_pb.UploadModelRequest(header=model_pb.UploadHeader(name="m", size_bytes=10, sha256="0" * 64))
    code, message = _code(lambda: upload(iter([header.SerializeToString(), b"\x0a\x05ab"]), timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in message, message


def test_a_stream_whose_client_never_reads_gives_its_slot_back(served) -> None:
    handle, client = served
    stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
    big = np.ones((4096, 4), np.float32)
    request = _v2_request("ok", list(big.shape), big.tobytes())
    # enough answers to fill every flow-control window between the handler and the client, which reads none
    stuck = stub.ModelStreamInfer(iter([request] * 400), timeout=120)
    try:
        wait_until(lambda: handle.dataplane.registry.get("ok", None).stats.snapshot().success_count > 0,
                   "the server answered the first requests")

        def slot_free() -> bool:
            time.sleep(0.1)  # one probe stream per 0.1 s while the stuck one holds the only slot
            try:
                answer = next(iter(stub.ModelStreamInfer(iter([_v2_request("ok", [1, 4], bytes(16))]), timeout=10)))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                return False
            return not answer.error_message

        wait_until(slot_free, "the stuck stream was cancelled and its slot freed", timeout=60)
    finally:
        stuck.cancel()


def test_v2_options_the_server_cannot_honour_are_refused(served) -> None:
    _, client = served
    stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
    x = np.ones((1, 4), np.float32).tobytes()
    Output = v2.ModelInferRequest.InferRequestedOutputTensor

    top_k_as_text = _v2_request("ok", [1, 4], x)
    top_k_as_text.parameters["top_k"].string_param = "2"
    twice = _v2_request("ok", [1, 4], x, outputs=[Output(name="y"), Output(name="y")])
    classification = _v2_request("ok", [1, 4], x, outputs=[Output(name="y")])
    classification.outputs[0].parameters["classification"].int64_param = 2
    # Triton's options for features this server does not have, an unknown parameter, and top_k without its
    # post-processing were answered OK, the option ignored
    triton_options = []
    for name, value in (("priority", 1), ("sequence_id", 7), ("sequence_start", True), ("my_option", "x")):
        request = _v2_request("ok", [1, 4], x)
        field = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], field, value)
        triton_options.append((request, name))
    top_k_alone = _v2_request("ok", [1, 4], x)
    top_k_alone.parameters["top_k"].int64_param = 1
    for request, words in ((top_k_as_text, "top_k must be"), (twice, "requested twice"),
                           (classification, "classification"), *triton_options,
                           (top_k_alone, "top_k applies to the top_k post-processing only")):
        code, message = _code(lambda: stub.ModelInfer(request, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in message, message
    as_uint = _v2_request("ok", [1, 4], x)
    as_uint.parameters["top_k"].uint64_param = 0
    assert stub.ModelInfer(as_uint, timeout=60).outputs[0].name == "y"


def test_open_health_watches_take_no_stream_threads(served) -> None:
    """grpc-health's Watch is open to anyone (no token needed) and stays open: more watches than the stream pool
    has threads must not keep a predict stream from being answered."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    handle, client = served
    health = health_pb2_grpc.HealthStub(client.channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
               for _ in range(handle.dataplane.settings.stream_threads + 4)]
    try:
        for watch in watches:  # each is open: its first answer came
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
        answers = list(stub.ModelStreamInfer(iter([_v2_request("ok", [1, 4], bytes(16))]), timeout=30))
        assert len(answers) == 1 and not answers[0].error_message
    finally:
        for watch in watches:
            watch.cancel()


def test_reflection_streams_are_bounded_and_time_out(served) -> None:
    """Reflection streams (open without a token) took stream threads without a slot or a timeout: enough idle
    ones and predict streams hung. Past the reflection slots a stream is refused, an idle one ends, and a
    predict stream is answered meanwhile."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    handle, client = served
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    settings = handle.dataplane.settings
    gates = [threading.Event() for _ in range(settings.stream_threads + 2)]

    def requests(gate: threading.Event):
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        gate.wait(30)  # then idle, the stream open

    streams = [stub.ServerReflectionInfo(requests(gate), timeout=30) for gate in gates]
    try:
        outcomes = []
        for stream in streams:
            try:
                outcomes.append("SERVICES" if next(stream).HasField("list_services_response") else "?")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        assert outcomes.count("SERVICES") == settings.max_open_reflection_streams
        assert set(outcomes) == {"SERVICES", "RESOURCE_EXHAUSTED"}
        v2_stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
        answers = list(v2_stub.ModelStreamInfer(iter([_v2_request("ok", [1, 4], bytes(16))]), timeout=30))
        assert len(answers) == 1 and not answers[0].error_message
        with pytest.raises(grpc.RpcError) as idle:  # the open ones end after the idle timeout
            next(streams[outcomes.index("SERVICES")])
        assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        for gate in gates:
            gate.set()
        for stream in streams:
            stream.cancel()


@pytest.mark.parametrize("field, value, words", [
    ("description", "d" * 5000, "description of 5000 characters"),  # stored in every manifest, sent by every GetModel
    ("format", 99, "unknown model format"),  # was read as "detect it" and accepted
])
def test_upload_headers_are_checked_before_anything_is_stored(served, field: str, value: object, words: str) -> None:
    handle, client = served
    header = model_pb.UploadHeader(name="m", size_bytes=4, sha256="0" * 64, **{field: value})
    requests = iter([model_pb.UploadModelRequest(header=header), model_pb.UploadModelRequest(chunk=b"abcd")])
    code, message = _code(lambda: client.models_stub.UploadModel(requests, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in message, message
    assert "m" not in handle.dataplane.repository.models()


def test_optimize_descriptions_are_bounded_too() -> None:
    from leanserve.server.errors import InvalidArgument
    from leanserve.server.optimize.options import OptimizeOptions, validate

    def options(chars: int) -> OptimizeOptions:
        return OptimizeOptions(model_name="m", quantize="int8", description="d" * chars)

    with pytest.raises(InvalidArgument, match="description of 5000 characters"):
        validate(options(5000), max_epochs=5, max_data_bytes=1 << 20)
    assert validate(options(4096), max_epochs=5, max_data_bytes=1 << 20).description == "d" * 4096


def test_tritons_timeout_parameter_bounds_the_wait(repo_dir: Path) -> None:
    """Triton's ``timeout`` request parameter (µs) was ignored: a request queued behind a busy model waited for
    as long as it took. It is the request's deadline now (the call's own deadline still applies when sooner)."""
    from tests.toy import GatedRunner

    handle = create_server(make_settings(repo_dir, batch_workers=1, batch_inline_below_us=0))
    gate = GatedRunner()
    gate.gate.clear()
    handle.dataplane.serve(toy_model(gate, name="slow", features=4))
    try:
        with Client(f"127.0.0.1:{handle.port}", timeout=60) as client:
            stub = v2_grpc.GRPCInferenceServiceStub(client.channel)
            x = np.ones((1, 4), np.float32).tobytes()
            first = stub.ModelInfer.future(_v2_request("slow", [1, 4], x), timeout=60)
            assert gate.entered.wait(30)  # the model is busy with the first request
            timed = _v2_request("slow", [1, 4], x)
            timed.parameters["timeout"].int64_param = 200_000
            started = time.monotonic()
            code, message = _code(lambda: stub.ModelInfer(timed, timeout=60))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, message
            assert time.monotonic() - started < 30
            gate.gate.set()
            assert first.result().outputs[0].name == "y"
    finally:
        gate.gate.set()
        handle.stop(0.5)
