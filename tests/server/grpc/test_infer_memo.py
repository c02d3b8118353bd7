"""infer_memo: a remembered header decodes exactly as the request would be decoded from scratch, and only requests
whose bytes mean "this header + one tensor" are remembered; v2_converters.infer_response_bytes: a response built
from a cached header is the response."""

from __future__ import annotations

import numpy as np
import pytest

from leanserve.client.wire import Unpacked
from leanserve.server.errors import InvalidArgument
from leanserve.server.grpc import v2_converters as conv
from leanserve.server.grpc.infer_memo import InferMemo, memo_decoder
from leanserve.server.serving.model import PredictResult
from leanserve.server.serving.postprocess import PostProcess
from leanserve.v2 import grpc_service_pb2 as pb

MAX = 64 * 1024 * 1024


def request(x: np.ndarray, name: str = "seed", **fields: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name, **fields)
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    return req


def scratch(data: bytes) -> conv.InferCall:
    return conv.infer_request(pb.ModelInferRequest.FromString(data), MAX)


def same(a: conv.InferCall, b: conv.InferCall) -> None:
    assert a._replace(inputs={}) == b._replace(inputs={})
    assert a.inputs.keys() == b.inputs.keys()
    for k in a.inputs:
        assert a.inputs[k].dtype == b.inputs[k].dtype and a.inputs[k].shape == b.inputs[k].shape
        np.testing.assert_array_equal(a.inputs[k], b.inputs[k])


def test_the_second_request_with_a_header_is_a_memo_hit_with_its_own_tensor() -> None:
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    rng = np.random.default_rng(0)
    first = request(rng.random((1, 1000), dtype=np.float32)).SerializeToString()
    assert memo.lookup(first) is None
    same(decode(first), scratch(first))
    assert len(memo) == 1
    for _ in range(5):
        x = rng.random((1, 1000), dtype=np.float32)
        data = request(x).SerializeToString()
        hit = memo.lookup(data)
        assert hit is not None
        same(hit, scratch(data))
        np.testing.assert_array_equal(hit.inputs["input"], x)
        a = hit.inputs["input"]
        assert a.flags.aligned  # copied when the tensor starts at an offset misaligned for float32 (codec.view)


@pytest.mark.parametrize("fields", [
    {},
    {"id": "req-7"},
    {"model_version": "3"},
    {"outputs": [pb.ModelInferRequest.InferRequestedOutputTensor(name="output")]},
    {"parameters": {"postprocess": pb.InferParameter(string_param="top_k"),
                    "top_k": pb.InferParameter(int64_param=3),
                    "timeout": pb.InferParameter(int64_param=5_000_000)}},
])
def test_memo_hits_decode_as_from_scratch(fields: dict) -> None:
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    rng = np.random.default_rng(1)
    for shape in [(1, 4), (3, 4), (0, 4)]:
        for _ in range(3):
            data = request(rng.random(shape, dtype=np.float32), **fields).SerializeToString()
            got = decode(data)
            assert type(got) is conv.InferCall
            same(got, scratch(data))
    assert len(memo) == 3  # one header per shape


def test_headers_of_the_same_length_are_told_apart() -> None:
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    a = request(x, name="aaaa").SerializeToString()
    b = request(x, name="bbbb").SerializeToString()
    assert len(a) == len(b)
    decode(a)
    decode(b)
    assert decode(a).model_name == "aaaa" and decode(b).model_name == "bbbb"
    assert len(memo) == 2


def test_a_request_whose_tensor_is_not_its_last_field_is_not_remembered_and_decodes_right() -> None:
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    full = request(x)
    tensor_only = pb.ModelInferRequest(raw_input_contents=full.raw_input_contents).SerializeToString()
    rest = pb.ModelInferRequest(model_name="seed", inputs=full.inputs).SerializeToString()
    data = tensor_only + rest  # the same message, fields out of the usual order
    for _ in range(2):
        same(decode(data), scratch(data))
    assert len(memo) == 0


def test_a_header_that_holds_a_tensor_record_itself_is_not_remembered() -> None:
    # head = a complete message with a tensor; then a second tensor record: two tensors for one input is an error
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    data = request(x).SerializeToString() + pb.ModelInferRequest(raw_input_contents=[x.tobytes()]).SerializeToString()
    got = decode(data)
    assert type(got) is Unpacked  # not a valid call: the servicer decodes it again and answers INVALID_ARGUMENT
    assert len(memo) == 0


def test_invalid_requests_are_left_to_the_servicer_and_not_remembered() -> None:
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    bad = request(np.zeros((1, 4), np.float32))
    bad.inputs[0].shape[:] = [1, 5]  # 16 bytes for 20
    got = decode(bad.SerializeToString())
    assert type(got) is Unpacked
    assert len(memo) == 0
    with pytest.raises(Exception, match="needs 20 bytes"):
        conv.infer_request(got.message, MAX)


def test_large_requests_keep_the_zero_copy_path() -> None:
    memo = InferMemo(MAX)
    decode = memo_decoder(memo)
    data = request(np.zeros((1, 100_000), np.float32)).SerializeToString()
    got = decode(data)
    assert type(got) is Unpacked and got.raws is not None
    assert len(memo) == 0


def test_the_memo_is_bounded() -> None:
    memo = InferMemo(MAX, max_entries=8)
    decode = memo_decoder(memo)
    x = np.zeros((1, 4), np.float32)
    for i in range(50):  # a client that sends a new id with every request
        decode(request(x, id=f"id-{i}").SerializeToString())
        assert 1 <= len(memo) <= 8


# -- the response side: infer_response_bytes -----------------------------------------------------------------------
def _result(outputs: dict[str, np.ndarray], name: str = "seed", version: int = 1) -> PredictResult:
    return PredictResult(name, version, outputs)


def _call(id_: str = "", outputs: tuple[str, ...] = ()) -> conv.InferCall:
    return conv.InferCall("seed", None, {}, PostProcess.RAW, 0, outputs, id_)


@pytest.mark.parametrize("case", [
    ({"output": np.arange(10, dtype=np.float32).reshape(1, 10)}, {}),
    ({"output": np.arange(10, dtype=np.float32).reshape(1, 10)}, {"id_": "abc"}),
    ({"output": np.arange(10, dtype=np.float32).reshape(1, 10)}, {"outputs": ("output",)}),
    ({"output": np.arange(6, dtype=np.int64).reshape(2, 3)}, {}),
    ({"output": np.arange(6, dtype=">f4").reshape(2, 3)}, {}),  # big-endian: sent little-endian
    ({"output": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]}, {}),  # not contiguous
    ({"output": np.zeros((0, 10), np.float32)}, {}),
    ({"probabilities": np.ones((1, 3), np.float32), "classes": np.zeros((1, 3), np.int64)}, {}),
    ({"output": np.array([[True, False]])}, {}),
])
def test_response_bytes_are_the_response(case: tuple) -> None:
    outputs, call_fields = case
    call = _call(**call_fields)
    expected = conv.infer_response(_result(outputs), call)
    for _ in range(3):  # the first fills the header cache, the others use it
        got = pb.ModelInferResponse.FromString(conv.infer_response_bytes(_result(outputs), call))
        assert got == expected


def test_response_bytes_follow_every_field_of_the_key() -> None:
    a = np.arange(10, dtype=np.float32).reshape(1, 10)
    conv.infer_response_bytes(_result({"output": a}), _call())
    for result, call in [
        (_result({"output": a}, name="other"), _call()),
        (_result({"output": a}, version=2), _call()),
        (_result({"output": a}), _call(id_="x")),
        (_result({"y": a}), _call()),
        (_result({"output": a.astype(np.float64)}), _call()),
        (_result({"output": a.reshape(2, 5)}), _call()),
        (_result({"output": a.view(np.int32)}), _call()),
        (_result({"output": a.astype(np.float16)}), _call()),
        (_result({"output": a + 1}), _call()),
    ]:
        for _ in range(2):
            got = pb.ModelInferResponse.FromString(conv.infer_response_bytes(result, call))
            assert got == conv.infer_response(result, call)


def test_response_bytes_refuse_an_output_the_model_does_not_have() -> None:
    a = np.zeros((1, 10), np.float32)
    conv.infer_response_bytes(_result({"output": a}), _call())
    with pytest.raises(InvalidArgument, match="no output 'other'"):
        conv.infer_response_bytes(_result({"output": a}), _call(outputs=("output", "other")))
    with pytest.raises(InvalidArgument, match="no output 'other'"):
        conv.infer_response_bytes(_result({"output": a}), _call(outputs=("other",)))


def test_long_headers_are_not_kept() -> None:
    memo = InferMemo(MAX, max_header_bytes=4096)
    decode = memo_decoder(memo)
    x = np.zeros((1, 4), np.float32)
    data = request(x, id="i" * 5000).SerializeToString()
    same(decode(data), scratch(data))
    assert len(memo) == 0
    conv._HEADS.clear()
    result, call = _result({"output": x}), _call(id_="i" * 5000)
    assert pb.ModelInferResponse.FromString(conv.infer_response_bytes(result, call)) == conv.infer_response(result,
                                                                                                         call)
    assert not conv._HEADS
