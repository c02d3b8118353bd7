"""The Open Inference Protocol through our own generated stubs: contents, errors, streams, repository, stats."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from leanserve.client import Client
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.v2 import grpc_service_pb2_grpc as pb_grpc
from leanserve.server.app import ServerHandle
from tests.toy import GatedRunner, toy_model

Tensor = pb.ModelInferRequest.InferInputTensor


@pytest.fixture
def stub(server: ServerHandle, client: Client) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    server.dataplane.serve(toy_model(GatedRunner(), features=4))
    yield pb_grpc.GRPCInferenceServiceStub(client.channel)


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code(), err.value.details()


def _out(resp: pb.ModelInferResponse, i: int = 0) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[i], np.float32).reshape(tuple(resp.outputs[i].shape))


def test_typed_contents_and_raw_contents_give_the_same_answer(stub) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    typed = stub.ModelInfer(pb.ModelInferRequest(
        model_name="toy", id="t", inputs=[Tensor(name="x", datatype="FP32", shape=[2, 4],
                                                 contents=pb.InferTensorContents(fp32_contents=x.ravel()))]))
    raw = stub.ModelInfer(pb.ModelInferRequest(
        model_name="toy", model_version="1", inputs=[Tensor(name="x", datatype="FP32", shape=[2, 4])],
        raw_input_contents=[x.tobytes()]))
    for resp in (typed, raw):
        assert resp.model_name == "toy" and resp.model_version == "1"
        out = resp.outputs[0]
        assert out.name == "y" and out.datatype == "FP32" and not out.contents.ListFields()  # raw only
        np.testing.assert_array_equal(_out(resp), x * 2)
    assert typed.id == "t"


@pytest.mark.parametrize("id_length", [0, 1, 2, 3])
def test_large_requests_are_answered_from_the_received_bytes(stub, id_length: int) -> None:
    """Requests over wire.SPLIT_MIN_BYTES are decoded with their raw bytes left in the received buffer (misaligned
    for float32 at most id lengths: then copied once): same answers, and a wrong byte count is still refused."""
    x = np.random.default_rng(id_length).random((64, 4096 // 16), dtype=np.float32).reshape(-1, 4)
    req = pb.ModelInferRequest(model_name="toy", id="i" * id_length, inputs=[Tensor(name="x", datatype="FP32",
                                                                                   shape=list(x.shape))],
                               raw_input_contents=[x.tobytes()])
    resp = stub.ModelInfer(req)
    assert resp.id == "i" * id_length
    np.testing.assert_array_equal(_out(resp), x * 2)
    answers = list(stub.ModelStreamInfer(iter([req, req])))
    for answer in answers:
        assert not answer.error_message
        np.testing.assert_array_equal(_out(answer.infer_response), x * 2)
    req.raw_input_contents[0] = x.tobytes()[:-4]
    code, details = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in details


def test_bytes_that_are_no_request_are_invalid_argument(stub, client: Client) -> None:
    """Undecodable request bytes (a truncated message) are INVALID_ARGUMENT on both protocols, unary and inside a
    stream (where that request gets its error answer and the stream goes on), small or large."""
    x = np.ones((2, 4), np.float32)
    good = pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="FP32", shape=[2, 4])],
                                raw_input_contents=[x.tobytes()]).SerializeToString()
    big = pb.ModelInferRequest(model_name="toy", raw_input_contents=[bytes(1 << 17)]).SerializeToString()
    raw = client.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                     response_deserializer=pb.ModelInferResponse.FromString)
    for garbage in (good[:-3], big[:-3], b"\xff\xff\xff"):
        code, details = _code(raw, garbage, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in details
    stream = client.channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                          response_deserializer=pb.ModelStreamInferResponse.FromString)
    answers = list(stream(iter([good, good[:-3], good]), timeout=30))
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    assert answers[1].error_message.startswith("INVALID_ARGUMENT")
    np.testing.assert_array_equal(_out(answers[2].infer_response), x * 2)
    v1_raw = client.channel.unary_unary("/leanserve.v1.InferenceService/Predict", request_serializer=None,
                                        response_deserializer=None)
    code, _ = _code(v1_raw, b"\x1a\x05\x0a\x01", timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_have_status_codes(stub) -> None:
    ok = Tensor(name="x", datatype="FP32", shape=[1, 4])
    one_row = [np.ones((1, 4), np.float32).tobytes()]
    cases = [
        (pb.ModelInferRequest(model_name="nope", inputs=[ok], raw_input_contents=one_row), grpc.StatusCode.NOT_FOUND),
        (pb.ModelInferRequest(model_name="toy", model_version="7", inputs=[ok], raw_input_contents=one_row),
         grpc.StatusCode.NOT_FOUND),
        (pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="INT64", shape=[1, 4])],
                              raw_input_contents=[np.ones((1, 4), np.int64).tobytes()]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="FP32", shape=[1, 5])],
                              raw_input_contents=[np.ones((1, 5), np.float32).tobytes()]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="FP32", shape=[2, 4])],
                              raw_input_contents=one_row), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="FP32", shape=[1, 4],
                              contents=pb.InferTensorContents(fp32_contents=[1, 2]))]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="BYTES", shape=[1, 4])]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="toy", model_version="latest", inputs=[ok], raw_input_contents=one_row),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="toy", inputs=[ok], raw_input_contents=one_row,
                              outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for request, expected in cases:
        assert _code(stub.ModelInfer, request)[0] == expected, request
    assert _code(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="toy", version="1")).ready


def test_stream_error_message_and_order(stub) -> None:
    def req(i: int, name: str = "toy") -> pb.ModelInferRequest:
        x = np.full((1, 4), i, np.float32)
        return pb.ModelInferRequest(model_name=name, id=str(i), raw_input_contents=[x.tobytes()],
                                    inputs=[Tensor(name="x", datatype="FP32", shape=[1, 4])])

    requests = [req(i) for i in range(20)]
    requests[7] = req(7, "nope")
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(20)]
    assert answers[7].error_message.startswith("NOT_FOUND:") and "nope" in answers[7].error_message
    for i, a in enumerate(answers):
        if i != 7:
            assert not a.error_message and _out(a.infer_response)[0, 0] == 2 * i


def test_stream_answers_carry_tritons_final_flag_when_asked(stub) -> None:
    """tritonclient's ``enable_empty_final_response``: each answer (errors too) says it is its request's last."""
    def req(name: str, flag: bool | None) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name=name, raw_input_contents=[np.ones((1, 4), np.float32).tobytes()],
                                 inputs=[Tensor(name="x", datatype="FP32", shape=[1, 4])])
        if flag is not None:
            r.parameters["triton_enable_empty_final_response"].bool_param = flag
        return r

    answers = list(stub.ModelStreamInfer(iter([req("toy", True), req("nope", True), req("toy", None),
                                               req("toy", False)]), timeout=60))
    flags = [dict(a.infer_response.parameters).get("triton_final_response") for a in answers]
    assert [f.bool_param if f is not None else None for f in flags] == [True, True, None, None]
    assert not answers[0].error_message and answers[1].error_message.startswith("NOT_FOUND")


def test_metadata_postprocess_and_statistics(stub) -> None:
    md = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert md.name == "leanserve" and "statistics" in md.extensions
    assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="toy"))
    assert (meta.versions, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == (["1"], "FP32", [-1, 4])
    x = np.array([[1, 5, 2, 3]], np.float32)
    resp = stub.ModelInfer(pb.ModelInferRequest(
        model_name="toy", inputs=[Tensor(name="x", datatype="FP32", shape=[1, 4])], raw_input_contents=[x.tobytes()],
        parameters={"postprocess": pb.InferParameter(string_param="argmax")}))
    assert resp.outputs[0].name == "class" and resp.outputs[0].datatype == "INT64"
    assert np.frombuffer(resp.raw_output_contents[0], np.int64).tolist() == [1]
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="toy")).model_stats
    assert len(stats) == 1 and stats[0].version == "1"
    assert stats[0].inference_stats.success.count == 1 and stats[0].inference_count == 1
    assert stats[0].execution_count == 1 and stats[0].batch_stats[0].batch_size == 1


def test_repository_unload_and_load(server: ServerHandle, client: Client, model_files) -> None:
    client.upload(model_files["seed_h5"], "seed")
    stub = pb_grpc.GRPCInferenceServiceStub(client.channel)
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    assert [(m.name, m.version, m.state) for m in index] == [("seed", "1", "READY")]

    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="seed"))
    assert not stub.ModelReady(pb.ModelReadyRequest(name="seed")).ready
    assert [m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models] == ["UNAVAILABLE"]
    assert not stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert (server.dataplane.repository.root / "seed" / "1").is_dir()  # kept on disk
    assert _code(client.predict, "seed", np.zeros((1, 1000), np.float32))[0] == grpc.StatusCode.NOT_FOUND

    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="seed"))
    assert stub.ModelReady(pb.ModelReadyRequest(name="seed")).ready
    assert client.predict("seed", np.zeros((1, 1000), np.float32)).output.shape == (1, 10)
    assert _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="nope"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert _code(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="nope"))[0] == \
        grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("call, request_", [
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(
        model_name="seed", parameters={"config": pb.ModelRepositoryParameter(string_param='{"max_batch_size": 8}')})),
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(
        model_name="seed", parameters={"file:1/model.onnx": pb.ModelRepositoryParameter(bytes_param=b"x")})),
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="seed", repository_name="other")),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="seed", repository_name="other")),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(
        model_name="seed", parameters={"unload_dependents": pb.ModelRepositoryParameter(string_param="yes")})),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(
        model_name="seed", parameters={"force": pb.ModelRepositoryParameter(bool_param=True)})),
    ("RepositoryIndex", pb.RepositoryIndexRequest(repository_name="other")),
])
def test_repository_options_this_server_cannot_honour_are_refused(server: ServerHandle, client: Client, call: str,
                                                                   request_: object) -> None:
    """Triton's load-time config and file overrides and a named repository were answered OK and ignored: the caller
    believed a model was loaded with its configuration. Each is INVALID_ARGUMENT, and the model is as it was."""
    server.dataplane.serve(toy_model(lambda x: x * 2, name="seed", features=4))
    stub = pb_grpc.GRPCInferenceServiceStub(client.channel)
    code, message = _code(getattr(stub, call), request_)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert stub.ModelReady(pb.ModelReadyRequest(name="seed")).ready


def test_tritonclients_unload_parameter_is_accepted(server: ServerHandle, client: Client) -> None:
    server.dataplane.serve(toy_model(lambda x: x * 2, name="toy", features=4))
    stub = pb_grpc.GRPCInferenceServiceStub(client.channel)
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
        model_name="toy", parameters={"unload_dependents": pb.ModelRepositoryParameter(bool_param=False)}))
    assert not stub.ModelReady(pb.ModelReadyRequest(name="toy")).ready


def test_repeated_requests_with_one_header_get_their_own_answers(stub, client: Client) -> None:
    """Unary requests that differ only in their tensor bytes decode from one remembered header (infer_memo) and are
    answered from one cached response header: each still gets the answer to its own tensor, and a request whose
    header bytes differ (another id, another shape, the tensor not last) is decoded for itself."""
    rng = np.random.default_rng(3)
    for i in range(40):
        x = rng.random((1 + i % 3, 4), dtype=np.float32)
        req = pb.ModelInferRequest(model_name="toy", id=("a", "b")[i % 2],
                                   inputs=[Tensor(name="x", datatype="FP32", shape=list(x.shape))],
                                   raw_input_contents=[x.tobytes()])
        resp = stub.ModelInfer(req)
        assert resp.id == ("a", "b")[i % 2] and list(resp.outputs[0].shape) == list(x.shape)
        np.testing.assert_array_equal(_out(resp), x * 2)
    send = client.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                                      response_deserializer=pb.ModelInferResponse.FromString)
    for _ in range(3):
        x = rng.random((1, 4), dtype=np.float32)
        out_of_order = (pb.ModelInferRequest(raw_input_contents=[x.tobytes()]).SerializeToString()
                        + pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="FP32",
                                                                                shape=[1, 4])]).SerializeToString())
        np.testing.assert_array_equal(_out(send(out_of_order, timeout=30)), x * 2)


def test_a_request_refused_for_its_outputs_or_options_computes_nothing_and_counts_as_failed(stub) -> None:
    """A requested output the request would not produce, an input parameter (none is served: shared memory among
    them) or a wrongly typed final-flag option: INVALID_ARGUMENT before any compute, counted as a failure."""
    x = np.ones((1, 4), np.float32)

    def req(**extra) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(model_name="toy", inputs=[Tensor(name="x", datatype="FP32", shape=[1, 4])],
                                    raw_input_contents=[x.tobytes()], **extra)

    Out = pb.ModelInferRequest.InferRequestedOutputTensor
    shm = Tensor(name="x", datatype="FP32", shape=[1, 4],
                 parameters={"shared_memory_region": pb.InferParameter(string_param="r0"),
                             "shared_memory_byte_size": pb.InferParameter(int64_param=16)})
    flag_as_text = req()
    flag_as_text.parameters["triton_enable_empty_final_response"].string_param = "true"
    cases = [
        (req(outputs=[Out(name="nope")]), "no output 'nope'"),
        (req(outputs=[Out(name="y"), Out(name="probabilities")]), "no output 'probabilities'"),
        (req(outputs=[Out(name="y")], parameters={"postprocess": pb.InferParameter(string_param="top_k")}),
         "no output 'y'; this request produces indices, scores"),
        (req(parameters={"postprocess": pb.InferParameter(string_param="top_k"),
                         "top_k": pb.InferParameter(int64_param=5)}), "top_k must be between 1 and 4"),
        (pb.ModelInferRequest(model_name="toy", inputs=[shm], raw_input_contents=[x.tobytes()]),
         "input parameters \\(shared_memory_byte_size, shared_memory_region\\) are not supported"),
        (flag_as_text, "triton_enable_empty_final_response must be a bool"),
    ]
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="toy")).model_stats[0]
    for request, message in cases:
        code, details = _code(stub.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and re.search(message, details), details
    stream = list(stub.ModelStreamInfer(iter([req(outputs=[Out(name="nope")]), req()]), timeout=60))
    assert stream[0].error_message.startswith("INVALID_ARGUMENT: no output 'nope'") and not stream[1].error_message
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="toy")).model_stats[0]
    # only the stream's valid request ran; the refused ones that reached a model count as failures
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 5
    ok = stub.ModelInfer(req(outputs=[Out(name="y")]))
    assert [o.name for o in ok.outputs] == ["y"] and _out(ok)[0, 0] == 2
