"""Unary ModelInfer requests decoded once per distinct header, not once per request.

A client sends the same request again and again with new tensor bytes: tritonclient serializes the model name, the
input's name, datatype and shape (and id, parameters, requested outputs, when set) first and the tensor bytes
(``raw_input_contents``, field 7) last. Protobuf parses a concatenation of two serialized messages as the first
merged with the second, so a request ``head + record`` (``record`` one complete ``raw_input_contents`` field) parses
as ``head``'s fields plus that one tensor, whatever ``head`` is. Once a request of this shape has been decoded and
checked (``v2_converters.infer_request``), any later request with the same length and the same bytes before its
tensor is the same call with other tensor bytes: ``InferMemo`` hands back that call with a view of the new bytes,
without parsing or checking again. What is remembered is exactly what those bytes mean (nothing about the model, the
registry or the caller), so every check that depends on anything else still runs for every request.

Only requests parsed whole (under ``wire.SPLIT_MIN_BYTES``) with one input sent as one raw tensor and a header of
at most ``max_header_bytes`` are remembered, at most ``max_entries`` headers (all forgotten when full: a client that
sends a new id with every request costs the others their hits, and this process a few MiB at most: the headers and
their decoded calls).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from leanserve.client import codec
from leanserve.client.wire import SPLIT_MIN_BYTES, Unpacked, trailing_record
from leanserve.server.grpc import v2_converters as conv
from leanserve.server.grpc.request_decoders import infer_request as decode_infer_request
from leanserve.v2 import grpc_service_pb2 as pb

_RAW_FIELD = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number
_INPUTS = conv.InferCall._fields.index("inputs")
#: the method whose requests are remembered (a stream's requests keep their message for the stream's answers)
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class _Header(NamedTuple):
    prefix: bytes  # everything before the tensor's bytes, the tensor record's key and length included
    before: tuple[Any, ...]  # the decoded call's fields before its ``inputs``
    after: tuple[Any, ...]  # and after them
    name: str
    shape: tuple[int, ...]
    dtype: Any


class InferMemo:
    """Decoded headers of unary ModelInfer requests, by request length. Thread-safe."""

    def __init__(self, max_bytes: int, max_entries: int = 256, max_header_bytes: int = 4096) -> None:
        #: the largest tensor a request may describe (``v2_converters.infer_request``'s ``max_bytes``)
        self.max_bytes = max_bytes
        self._max_entries = max_entries
        self._max_header_bytes = max_header_bytes
        self._by_length: dict[int, list[_Header]] = {}
        self._entries = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._entries

    def lookup(self, data: bytes) -> conv.InferCall | None:
        """The call ``data`` decodes to, if a request with its header was remembered; else None."""
        headers = self._by_length.get(len(data))
        if headers:
            for h in headers:
                if data.startswith(h.prefix):
                    x = codec.view(h.shape, h.dtype, data, len(h.prefix))
                    # the call's fields with this request's input (tuple.__new__: _replace costs several times more)
                    return tuple.__new__(conv.InferCall, (*h.before, {h.name: x}, *h.after))
        return None

    def remember(self, data: bytes, message: pb.ModelInferRequest, call: conv.InferCall) -> None:
        """Keep ``call`` (decoded from ``data``, parsed as ``message``) for later requests with its header."""
        if len(data) >= SPLIT_MIN_BYTES or len(call.inputs) != 1 or len(message.raw_input_contents) != 1:
            return
        raw = message.raw_input_contents[0]
        if len(data) - len(raw) > self._max_header_bytes:  # a long id or name: not worth keeping
            return
        start = trailing_record(data, _RAW_FIELD, raw)
        if start is None:  # the tensor is not the last field
            return
        try:
            if pb.ModelInferRequest.FromString(data[:start]).raw_input_contents:
                return  # another tensor record in the header: not a request of this shape
        except DecodeError:
            return  # the split is not between two fields
        [(name, x)] = call.inputs.items()
        header = _Header(data[:len(data) - len(raw)], call[:_INPUTS], call[_INPUTS + 1:], name, x.shape, x.dtype)
        with self._lock:
            if self._entries >= self._max_entries:
                self._by_length.clear()
                self._entries = 0
            same_length = self._by_length.setdefault(len(data), [])
            if all(h.prefix != header.prefix for h in same_length):  # two threads may have decoded it at once
                same_length.append(header)
                self._entries += 1


def memo_decoder(memo: InferMemo) -> Callable[[bytes], Any]:
    """The unary ModelInfer request deserializer: a remembered header's call at once; otherwise the request decoded
    as ``request_decoders.infer_request`` does, and checked: a valid one comes back as its ``InferCall`` (and is
    remembered), an invalid one as decoded, for the servicer to decode again and answer its error."""
    max_bytes = memo.max_bytes

    def decode(data: bytes) -> Any:
        call = memo.lookup(data)
        if call is not None:
            return call
        decoded = decode_infer_request(data)
        if type(decoded) is not Unpacked or decoded.raws is not None:
            return decoded
        try:
            call = conv.infer_request(decoded.message, max_bytes)
        except Exception:  # noqa: BLE001 -- the servicer decodes it again and answers the error as its own
            return decoded
        memo.remember(data, decoded.message, call)
        return call

    return decode


def with_infer_memo(decoders: dict[str, Callable[[bytes], Any]], max_bytes: int) -> dict[str, Callable[[bytes], Any]]:
    """``decoders`` (``request_decoders.REQUEST_DECODERS``) with unary ModelInfer's replaced by a memo's."""
    return {**decoders, MODEL_INFER: memo_decoder(InferMemo(max_bytes))}
