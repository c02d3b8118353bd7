"""Inside PredictStream and ModelStreamInfer a bad request gets its own error answer (with its status) and the
stream goes on; malformed versions and shapes are INVALID_ARGUMENT in unary calls too, never INTERNAL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from leanserve.client import Client, common
from leanserve.v1 import inference_service_pb2 as inf_pb
from leanserve.v1 import tensor_pb2
from leanserve.v2 import grpc_service_pb2 as v2
from leanserve.v2 import grpc_service_pb2_grpc as v2_grpc
from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings
from tests.toy import toy_model

POISON = 666.0  # the toy kernel fails on this value, as a bug in one request's handling would
HUGE = 2**62
BAD_SHAPES = {
    "negative": [-1, 3],
    "overflowing": [HUGE, HUGE],  # the int64 product wraps around
    "zero_beside_huge": [0, HUGE],
    "too_many_dims": [1] * 100,
}
Tensor = v2.ModelInferRequest.InferInputTensor


def _poisoned(x: np.ndarray) -> np.ndarray:
    if (x == POISON).any():
        raise RuntimeError("the kernel failed")  # not a LeanserveError: a bug
    return x * 2


@pytest.fixture
def address(repo_dir: Path) -> Iterator[str]:
    handle: ServerHandle = create_server(make_settings(repo_dir))
    handle.dataplane.serve(toy_model(_poisoned, features=3))
    yield f"127.0.0.1:{handle.port}"
    handle.stop(0.5)


def _v2(rid: str, x: np.ndarray | None = None, *, name: str = "toy", version: str = "",
        shape: list[int] | None = None) -> v2.ModelInferRequest:
    x = np.full((1, 3), float(rid) if rid.isdigit() else 1.0, np.float32) if x is None else x
    return v2.ModelInferRequest(
        model_name=name, model_version=version, id=rid,
        inputs=[Tensor(name="x", datatype="FP32", shape=x.shape if shape is None else shape)],
        raw_input_contents=[x.tobytes()])


def _v1(rid: str, x: np.ndarray | None = None, *, name: str = "toy",
        shape: list[int] | None = None) -> inf_pb.PredictRequest:
    x = np.full((1, 3), float(rid) if rid.isdigit() else 1.0, np.float32) if x is None else x
    request = common.predict_request(name, x, request_id=rid)
    if shape is not None:
        request.inputs[0].shape[:] = shape
    return request


def test_predict_stream_answers_each_bad_request_and_goes_on(address: str) -> None:
    bad = {
        "unknown_model": (_v1("unknown_model", name="nope"), grpc.StatusCode.NOT_FOUND),
        "wrong_width": (_v1("wrong_width", np.ones((1, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
        "bug": (_v1("bug", np.full((1, 3), POISON, np.float32)), grpc.StatusCode.INTERNAL),
        **{k: (_v1(k, shape=s), grpc.StatusCode.INVALID_ARGUMENT) for k, s in BAD_SHAPES.items()},
        "no_dtype": (inf_pb.PredictRequest(model_name="toy", request_id="no_dtype",
                                           inputs=[tensor_pb2.Tensor(shape=[1, 3])]),
                     grpc.StatusCode.INVALID_ARGUMENT),
    }
    requests = []
    for i, (request, _) in enumerate(bad.values()):
        requests += [_v1(str(i)), request]
    requests.append(_v1("99"))
    with Client(address, timeout=60) as c:
        answers = list(c.inference_stub.PredictStream(iter(requests), timeout=60))
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    by_id = {a.request_id: a for a in answers}
    for rid, (_, code) in bad.items():
        assert by_id[rid].HasField("error"), rid
        assert by_id[rid].error.code == code.value[0], (rid, by_id[rid].error)
    for a in answers:
        if a.request_id.isdigit():
            assert not a.HasField("error"), a.error
            np.testing.assert_array_equal(common.outputs(a)["y"], np.full((1, 3), 2 * float(a.request_id)))


def test_model_stream_infer_answers_each_bad_request_and_goes_on(address: str) -> None:
    bad = {
        "unknown_model": (_v2("unknown_model", name="nope"), "NOT_FOUND"),
        "superscript_version": (_v2("superscript_version", version="²"), "INVALID_ARGUMENT"),
        "unknown_version": (_v2("unknown_version", version="7"), "NOT_FOUND"),
        "wrong_width": (_v2("wrong_width", np.ones((1, 4), np.float32)), "INVALID_ARGUMENT"),
        "bug": (_v2("bug", np.full((1, 3), POISON, np.float32)), "INTERNAL"),
        **{k: (_v2(k, shape=s), "INVALID_ARGUMENT") for k, s in BAD_SHAPES.items()},
    }
    requests = []
    for i, (request, _) in enumerate(bad.values()):
        requests += [_v2(str(i)), request]
    requests.append(_v2("99"))
    with grpc.insecure_channel(address) as channel:
        answers = list(v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=60))
    assert [a.infer_response.id for a in answers] == [r.id for r in requests]
    by_id = {a.infer_response.id: a for a in answers}
    for rid, (_, code) in bad.items():
        assert by_id[rid].error_message.startswith(f"{code}:"), (rid, by_id[rid].error_message)
    for a in answers:
        if a.infer_response.id.isdigit():
            assert not a.error_message, a.error_message
            out = np.frombuffer(a.infer_response.raw_output_contents[0], np.float32)
            np.testing.assert_array_equal(out, np.full(3, 2 * float(a.infer_response.id)))


def test_unary_calls_refuse_malformed_versions_and_shapes_as_invalid_argument(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        calls = {
            "ModelInfer ²": lambda: stub.ModelInfer(_v2("1", version="²"), timeout=60),
            "ModelInfer long version": lambda: stub.ModelInfer(_v2("1", version="9" * 40), timeout=60),
            "ModelMetadata ²": lambda: stub.ModelMetadata(v2.ModelMetadataRequest(name="toy", version="²"),
                                                          timeout=60),
            "ModelReady ²": lambda: stub.ModelReady(v2.ModelReadyRequest(name="toy", version="²"), timeout=60),
            "ModelStatistics ²": lambda: stub.ModelStatistics(v2.ModelStatisticsRequest(name="toy", version="²"),
                                                              timeout=60),
            **{f"ModelInfer {k}": (lambda s=s: stub.ModelInfer(_v2("1", shape=s), timeout=60))
               for k, s in BAD_SHAPES.items()},
        }
        with Client(address, timeout=60) as c:
            calls.update({f"Predict {k}": (lambda s=s: c.inference_stub.Predict(_v1("1", shape=s), timeout=60))
                          for k, s in BAD_SHAPES.items()})
            for what, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.details())
            # and the server still answers
            np.testing.assert_array_equal(c.predict("toy", np.ones((1, 3), np.float32)).outputs["y"], 2)
