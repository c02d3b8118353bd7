"""client/wire.py: tensor bytes on the protobuf wire without the runtime's copies.

``join`` must serialize exactly the message the protobuf runtime would (parsed back, field for field), with the
tensor bytes aligned when asked; ``split`` must decode exactly what ``FromString`` decodes, or fail the same way,
on any input, including hostile bytes (hypothesis), and hand out views of the received buffer, not copies.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanserve.client import common, wire
from leanserve.server.errors import InvalidArgument
from leanserve.server.grpc import converters, request_decoders, v2_converters
from leanserve.v1 import inference_service_pb2 as v1_pb
from leanserve.v2 import grpc_service_pb2 as v2_pb

FUZZ = settings(derandomize=True, deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.zeros((0, 5), np.int8),
    np.array(3.0),
    np.ones((2, 3), ">f8"),
    np.arange(6.0).reshape(2, 3).T,  # not C-contiguous
    np.array([True, False]),
    np.random.default_rng(0).random((64, 300), dtype=np.float32),  # over SPLIT_MIN_BYTES
]


@pytest.mark.parametrize("x", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
@pytest.mark.parametrize("model", ["", "m", "seed" * 40])
def test_predict_request_bytes_is_the_message_the_runtime_serializes(x: np.ndarray, model: str) -> None:
    data = common.predict_request_bytes(model, x, version=3, postprocess="top_k", top_k=2, request_id="r",
                                        input_name="in")
    parsed = v1_pb.PredictRequest.FromString(data)
    assert len(parsed.padding) < 16 and not parsed.padding.strip(b"\0")
    assert bool(parsed.padding) <= (x.nbytes >= wire.SPLIT_MIN_BYTES)  # small arrays: the message path
    parsed.ClearField("padding")
    assert parsed == common.predict_request(model, x, version=3, postprocess="top_k", top_k=2, request_id="r",
                                            input_name="in")
    if x.nbytes >= wire.SPLIT_MIN_BYTES:
        wire_bytes = np.ascontiguousarray(x, x.dtype.newbyteorder("<")).tobytes()
        assert data.index(wire_bytes) % 16 == 0  # the padding put the tensor bytes at an aligned offset


@pytest.mark.parametrize("x", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_split_gives_views_of_the_received_bytes_and_the_same_arrays(x: np.ndarray) -> None:
    data = common.predict_request_bytes("m", x, request_id="7")
    unpacked = request_decoders.predict_request(data)
    message, raws = request_decoders.unpack(unpacked)
    inputs, _, _ = converters.predict_request(message, raws)
    expected, _, _ = converters.predict_request(v1_pb.PredictRequest.FromString(data))
    np.testing.assert_array_equal(inputs[""], expected[""])
    assert message.request_id == "7" and message.model_name == "m"
    if len(data) < wire.SPLIT_MIN_BYTES:
        assert raws is None and message.inputs[0].data == expected[""].tobytes()
    else:
        assert raws is not None and raws[0].obj is data and message.inputs[0].data == b""
        assert not inputs[""].flags.owndata and np.shares_memory(inputs[""], np.frombuffer(data, np.uint8))


def test_misaligned_bytes_are_copied_once_for_the_kernels() -> None:
    """A V2 request whose raw bytes start at an odd offset: decoded right, as an aligned copy."""
    x = np.random.default_rng(1).random((40, 500), dtype=np.float32)
    for name in ("a", "ab", "abc", "abcd"):  # shifts the offset of the raw bytes
        req = v2_pb.ModelInferRequest(model_name=name)
        req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        req.raw_input_contents.append(x.tobytes())
        message, raws = request_decoders.unpack(request_decoders.infer_request(req.SerializeToString()))
        a = v2_converters.infer_request(message, raws=raws).inputs["input"]
        assert a.flags.aligned and message.model_name == name and not message.raw_input_contents
        np.testing.assert_array_equal(a, x)


def test_a_tensor_with_its_bytes_twice_is_left_to_protobuf() -> None:
    """The last value of a repeated singular field wins in protobuf; split does not guess, it parses whole."""
    big = bytes(wire.SPLIT_MIN_BYTES)
    tensor = b"\x22" + wire._encode_varint(len(big)) + big + b"\x22\x02ab"
    data = b"\x0a\x01m" + b"\x1a" + wire._encode_varint(len(tensor)) + tensor
    unpacked = request_decoders.predict_request(data)
    assert unpacked.raws is None and unpacked.message.inputs[0].data == b"ab"


@pytest.mark.parametrize("nested", [False, True])
def test_a_message_of_many_tiny_fields_is_left_to_protobuf(nested: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Millions of 2-byte fields (top level, or inside one tensor): split gives up after MAX_FIELDS and protobuf's
    C parser takes the whole message, so the Python walk (in grpc's poll thread, holding the GIL) stays a few
    hundred fields long whatever the message holds."""
    varints = []
    real = wire._varint
    monkeypatch.setattr(wire, "_varint", lambda *a: varints.append(1) or real(*a))
    filler = b"\x20\x01" * 2_000_000  # top_k = 1, again and again (or a tensor's dtype)
    big = b"\x22" + wire._encode_varint(wire.SPLIT_MIN_BYTES) + bytes(wire.SPLIT_MIN_BYTES)
    tensor = (filler if nested else b"") + big
    data = (b"" if nested else filler) + b"\x1a" + wire._encode_varint(len(tensor)) + tensor
    decoded = request_decoders.predict_request(data)
    assert len(varints) <= 4 * wire.MAX_FIELDS
    assert decoded.raws is None and len(decoded.message.inputs[0].data) == wire.SPLIT_MIN_BYTES


def _reassembled(data: bytes, v2: bool) -> object:
    """What split decoded, with the bytes it took out put back: must equal FromString(data). Bytes that are not a
    valid message raise DecodeError, as FromString does (the server's decoder answers them INVALID_ARGUMENT)."""
    decoded = (request_decoders.infer_request if v2 else request_decoders.predict_request)(data)
    if type(decoded) is request_decoders.Undecodable:
        with pytest.raises(InvalidArgument, match="is not a valid"):
            request_decoders.unpack(decoded)
        raise DecodeError(decoded.error)
    message = decoded.message
    if v2:
        if decoded.raws is not None:
            message.raw_input_contents.extend(bytes(r) for r in decoded.raws)
        return message
    for tensor, raw in zip(message.inputs, decoded.raws or ()):
        if raw is not None:
            tensor.data = bytes(raw)
    return message


def _key(number: int, kind: int) -> bytes:
    return wire._encode_varint(number << 3 | kind)


def _len(number: int, body: bytes) -> bytes:
    return _key(number, 2) + wire._encode_varint(len(body)) + body


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    return draw(st.binary(max_size=8)) + bytes(draw(st.sampled_from([0, 0, wire.SPLIT_MIN_BYTES])))


@st.composite
def _garbage(draw: st.DrawFn) -> bytes:
    """A record protobuf may refuse: a group or invalid wire type, a bad length, field number 0."""
    number = draw(st.integers(0, 9))
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))
    body = draw(st.binary(max_size=12))
    return _key(number, kind) + (wire._encode_varint(len(body) + draw(st.sampled_from([-1, 1, 99]))) + body
                                 if kind == 2 and body else body)


@st.composite
def _tensor(draw: st.DrawFn, v2: bool) -> bytes:
    """A tensor message (v1 Tensor or V2 InferInputTensor), mostly well-formed, its bytes field 0-2 times."""
    fields = [_len(1, draw(st.text("abc", max_size=3)).encode()),
              _key(2, 0) + wire._encode_varint(draw(st.integers(0, 12))) if not v2 else _len(2, b"FP32"),
              _len(3, b"".join(wire._encode_varint(d) for d in draw(st.lists(st.integers(0, 300), max_size=3))))]
    if not v2:
        fields += [_len(4, draw(_payload())) for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2])))]
    fields += [draw(_garbage()) for _ in range(draw(st.sampled_from([0, 0, 0, 1])))]
    return b"".join(draw(st.permutations(fields)))


@st.composite
def messages(draw: st.DrawFn, v2: bool) -> bytes:
    """A PredictRequest or ModelInferRequest: well-formed records in any order and number, now and then a
    garbage record, a wrong wire type for the tensor field, a cut or a flipped byte."""
    tensor_field = 7 if v2 else 3
    fields = [_len(1, b"m"), _len(6 if not v2 else 2, b"r"), _key(2 if not v2 else 9, 0) + b"\x05"]
    for _ in range(draw(st.integers(0, 3))):
        fields.append(_len(5, draw(_tensor(v2))) if v2 else _len(3, draw(_tensor(v2))))
    if v2:
        fields += [_len(7, draw(_payload())) for _ in range(draw(st.integers(0, 3)))]
    if draw(st.integers(0, 9)) == 0:
        fields.append(_key(tensor_field, 0) + b"\x01")
    if draw(st.integers(0, 4)) == 0:
        fields.append(draw(_garbage()))
    data = b"".join(draw(st.permutations(fields)))
    if data and draw(st.integers(0, 4)) == 0:
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data[:cut] + bytes([draw(st.integers(0, 255))]) + data[cut + 1:]
    return data


@FUZZ
@given(st.booleans().flatmap(lambda v2: st.tuples(messages(v2), st.just(v2))))
def test_split_decodes_what_protobuf_decodes_or_fails_the_same_way(case: tuple[bytes, bool]) -> None:
    data, v2 = case
    parse = (v2_pb.ModelInferRequest if v2 else v1_pb.PredictRequest).FromString
    try:
        expected = parse(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            _reassembled(data, v2)
        return
    assert _reassembled(data, v2) == expected


def test_trailing_record_finds_only_a_last_record_holding_the_value() -> None:
    raw = bytes(range(200))  # a 2-byte length
    head = v2_pb.ModelInferRequest(model_name="m").SerializeToString()
    data = head + v2_pb.ModelInferRequest(raw_input_contents=[raw]).SerializeToString()
    assert wire.trailing_record(data, 7, raw) == len(head)
    assert wire.trailing_record(data, 6, raw) is None  # another field number
    assert wire.trailing_record(data, 7, raw[1:]) is None  # a shorter value: its length would not match
    assert wire.trailing_record(data + head, 7, raw) is None  # not the last record
    assert wire.trailing_record(raw[-3:], 7, raw) is None  # shorter than a record
