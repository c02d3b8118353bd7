"""Property tests of the protobuf ↔ numpy boundary and of post-processing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from leanserve.v1 import tensor_pb2
from leanserve.server.errors import InvalidArgument
from leanserve.server.grpc.converters import numpy_to_tensor, tensor_to_numpy
from leanserve.server.serving.postprocess import PostProcess, apply, softmax

DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "bool"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, max_side=6))))
def test_tensor_round_trip(a: np.ndarray) -> None:
    t = numpy_to_tensor("x", a)
    back = tensor_to_numpy(tensor_pb2.Tensor.FromString(t.SerializeToString()))
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back.tobytes(), np.require(a, requirements="C").tobytes())


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5))))
def test_big_endian_input_is_sent_little_endian(a: np.ndarray) -> None:
    back = tensor_to_numpy(numpy_to_tensor("x", a.astype(">f4")))
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("delta", [-1, 1])
def test_byte_count_must_match_shape(delta: int) -> None:
    t = numpy_to_tensor("x", np.zeros((2, 3), np.float32))
    t.data = t.data[:-1] if delta < 0 else t.data + b"\0"
    with pytest.raises(InvalidArgument, match="needs 24 bytes"):
        tensor_to_numpy(t)


def test_unset_dtype_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        tensor_to_numpy(tensor_pb2.Tensor(name="x", shape=[1], data=b"\0\0\0\0"))


logits = hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 12)),
                    elements=st.floats(-30, 30, width=32))


@settings(max_examples=100, deadline=None)
@given(logits, st.integers(1, 12))
def test_top_k_is_sorted_prefix_of_probabilities(y: np.ndarray, k: int) -> None:
    k = min(k, y.shape[1])
    out = apply(PostProcess.TOP_K, "y", y, is_probability=False, top_k=k)
    probs = softmax(y)
    assert out["indices"].shape == (y.shape[0], k)
    np.testing.assert_allclose(out["scores"], np.take_along_axis(probs, out["indices"], 1), rtol=1e-6)
    assert np.all(np.diff(out["scores"], axis=1) <= 1e-7)
    kth_best = np.sort(probs, axis=1)[:, ::-1][:, k - 1]
    assert np.all(out["scores"][:, -1] >= kth_best - 1e-7)


@given(logits)
def test_argmax_and_probabilities(y: np.ndarray) -> None:
    cls = apply(PostProcess.ARGMAX, "y", y, is_probability=False)["class"]
    assert cls.dtype == np.int64 and cls.shape == (y.shape[0],)
    for row, c in zip(y, cls):  # what "the class" means: a largest value, the first one on ties
        assert row[c] == row.max() and (row[:c] < row[c]).all()
    p = apply(PostProcess.PROBABILITIES, "y", y, is_probability=False)["probabilities"]
    e = np.exp(y.astype(np.float64) - y.astype(np.float64).max(axis=1, keepdims=True))
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)  # float64 softmax
    # already probabilities: passed through, not softmaxed twice
    q = np.abs(y) + 1e-3
    q /= q.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(apply(PostProcess.PROBABILITIES, "y", q, is_probability=True)["probabilities"], q)


V2_DTYPES = [*DTYPES, "uint16", "uint32", "uint64", ">f4", ">f8", ">i4", ">i8", ">u2", ">f2"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(V2_DTYPES).flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=3,
                                                                                     max_side=5))),
       st.booleans())
def test_v2_response_is_little_endian_c_order_with_its_datatype(a: np.ndarray, transposed: bool) -> None:
    """Whatever a model or post-processing returns (any byte order, any layout), the V2 answer carries the values
    as little-endian C-order bytes under the datatype of the value type."""
    from leanserve.server.grpc import v2_converters as conv
    from leanserve.server.serving.model import PredictResult
    from leanserve.v2 import grpc_service_pb2 as pb

    if transposed:
        a = a.T
    call = conv.InferCall("m", None, {}, PostProcess.RAW, 0, (), "7")
    resp = pb.ModelInferResponse.FromString(
        conv.infer_response(PredictResult("m", 3, {"y": a}), call).SerializeToString())
    (out,), (raw,) = resp.outputs, resp.raw_output_contents
    little = a.dtype.newbyteorder("<")
    assert (resp.model_version, resp.id, out.name, list(out.shape)) == ("3", "7", "y", list(a.shape))
    assert out.datatype == conv.v2_datatype(little.newbyteorder("="))
    np.testing.assert_array_equal(np.frombuffer(raw, little).reshape(a.shape), a)


@pytest.mark.parametrize("datatype, field, values, ok", [
    ("INT8", "int_contents", [-128, 127], True), ("INT8", "int_contents", [1, 128], False),
    ("INT8", "int_contents", [-129, 0], False), ("UINT8", "uint_contents", [0, 255], True),
    ("UINT8", "uint_contents", [256, 0], False), ("INT16", "int_contents", [-32768, 32767], True),
    ("INT16", "int_contents", [40000, 0], False), ("UINT16", "uint_contents", [65536, 1], False),
])
def test_v2_narrow_integer_contents_never_wrap(datatype: str, field: str, values: list[int], ok: bool) -> None:
    """INT8/INT16/UINT8/UINT16 travel in 32-bit ``contents`` fields: a value out of the type's range is refused,
    not wrapped around (129 as INT8 would otherwise reach the model as -127)."""
    from leanserve.server.grpc import v2_converters as conv
    from leanserve.v2 import grpc_service_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[1, 2])
    getattr(tensor.contents, field).extend(values)
    request = pb.ModelInferRequest(model_name="m", inputs=[tensor])
    if ok:
        x = conv.infer_request(request).inputs["x"]
        assert x.dtype == conv.DTYPES[datatype] and x.tolist() == [values]
    else:
        with pytest.raises(InvalidArgument, match="outside the range"):
            conv.infer_request(request)


class _Dims:
    """A repeated dims field of a million entries that fails the test if anything reads them."""

    def __len__(self) -> int:
        return 1_000_000

    def __iter__(self):
        raise AssertionError("the dimensions were read before they were counted")

    __getitem__ = __iter__


def test_v2_and_v1_count_dimensions_before_reading_them() -> None:
    from leanserve.server.grpc import v2_converters as conv

    class Tensor:
        name, datatype, shape = "x", "FP32", _Dims()

    with pytest.raises(InvalidArgument, match="1000000 dimensions"):
        conv._signature(Tensor(), 2**40)
    with pytest.raises(InvalidArgument, match="1000000 dimensions"):
        tensor_to_numpy(Tensor())
