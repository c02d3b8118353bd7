"""Large tensor bytes on the protobuf wire without the copies the protobuf runtime makes of them.

Python's protobuf copies a bytes field when a message is parsed, again each time the field is read, when it is set
and when the message is serialized. For a request of a few KB that is nothing; for a stream of 1 MB batches those
copies are a large part of what the server and the client spend per message. This module handles the one field
of a tensor request that is large, and leaves everything else to protobuf:

- ``split`` (server side): the received request as protobuf parses it without its tensor bytes, plus those bytes
  as zero-copy views of the received buffer. Anything it does not understand (a malformed or unusual encoding) is
  left to protobuf's own parser, which accepts or refuses it as it always did.
- ``join`` (client side): a serialized request from the message without its tensor bytes plus the arrays, copied
  once into the output.

Both follow the protobuf encoding (https://protobuf.dev/programming-guides/encoding/): a field is a varint key
(number << 3 | wire type) and, for wire type 2, a varint length and that many bytes; a repeated bytes field is one
such record per element, in order; an embedded message is a length-delimited record of its own fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
#: below this many bytes a message is parsed as is: splitting costs more than the copies it saves
SPLIT_MIN_BYTES = 64 * 1024
#: fields ``split`` walks in one message (each level) before it leaves the message to protobuf's parser: a request
#: has a handful; a hostile one of millions of tiny fields must cost C time, not a Python loop holding the GIL
MAX_FIELDS = 256


class _Malformed(Exception):
    """Not an encoding ``split`` handles; protobuf's own parser decides."""


class Unpacked(NamedTuple):
    """A request as received: the message (without the large bytes ``split`` took out) and those bytes."""

    message: Any
    #: per tensor, in order, a read-only view of its bytes in the received buffer; None = the message holds them
    raws: list[memoryview | None] | None


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(number, wire type, record start, value start, value end) of each field in ``buf[start:end]``."""
    pos, left = start, MAX_FIELDS
    while pos < end:
        left -= 1
        if left < 0:
            raise _Malformed
        key, at = _varint(buf, pos, end)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise _Malformed
        if kind == _VARINT:
            _, stop = _varint(buf, at, end)
        elif kind == _LEN:
            size, at = _varint(buf, at, end)
            stop = at + size
        elif kind == _I64:
            stop = at + 8
        elif kind == _I32:
            stop = at + 4
        else:  # groups (3, 4) and invalid wire types
            raise _Malformed
        if stop > end:
            raise _Malformed
        yield number, kind, pos, at, stop
        pos = stop


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, kind: int) -> bytes:
    return _encode_varint(number << 3 | kind)


def trailing_record(data: bytes, field: int, value: bytes) -> int | None:
    """Where the record starts when ``data`` ends with one record of the length-delimited field ``field`` holding
    ``value`` (key, length, ``value``); None otherwise. What comes before is not parsed: the caller checks it."""
    at = len(data) - len(value)
    head = _key(field, _LEN) + _encode_varint(len(value))
    if at < len(head) or data[at - len(head):at] != head or data[at:] != value:
        return None
    return at - len(head)


def split(data: bytes, parse: Any, field: int, inner: int | None = None) -> Unpacked:
    """``data`` parsed by ``parse`` (a message class's ``FromString``) with its tensor bytes taken out as views.

    ``field``: the repeated field holding the tensors. Without ``inner`` it is a repeated bytes field (the Open
    Inference Protocol's ``raw_input_contents``): each element becomes a view. With ``inner`` it is a repeated
    message field and ``inner`` its bytes field (leanserve.v1 ``inputs[i].data``): each element's bytes become a
    view, or None when the element has none. Messages under ``SPLIT_MIN_BYTES`` and any encoding this does not
    handle (a tensor message with its bytes field twice, a wire type that does not match) are parsed whole:
    ``raws`` is None and the message holds everything, exactly as ``parse(data)``.
    """
    if len(data) < SPLIT_MIN_BYTES:
        return Unpacked(parse(data), None)
    try:
        kept, raws = _split(data, field, inner)
    except _Malformed:
        return Unpacked(parse(data), None)
    view = memoryview(data)
    head = b"".join(view[k[0]:k[1]] if type(k) is tuple else k for k in kept)
    return Unpacked(parse(head), [None if r is None else view[r[0]:r[1]] for r in raws])


def _split(data: bytes, field: int, inner: int | None) -> tuple[list[tuple[int, int] | bytes],
                                                               list[tuple[int, int] | None]]:
    """What to keep (ranges of ``data``, and re-encoded tensor records as bytes) and each tensor's bytes range."""
    kept: list[tuple[int, int] | bytes] = []
    raws: list[tuple[int, int] | None] = []
    for number, kind, rec, at, stop in _fields(data, 0, len(data)):
        if number != field:
            kept.append((rec, stop))
            continue
        if kind != _LEN:
            raise _Malformed
        if inner is None:
            raws.append((at, stop))
            continue
        found = None
        rest: list[tuple[int, int]] = []
        for n, k, r, a, s in _fields(data, at, stop):
            if n == inner:
                if k != _LEN or found is not None:
                    raise _Malformed
                found = (a, s)
            else:
                rest.append((r, s))
        raws.append(found)
        if found is None:
            kept.append((rec, stop))
        else:
            size = sum(s - r for r, s in rest)
            kept.append(_key(field, _LEN) + _encode_varint(size) + b"".join(data[r:s] for r, s in rest))
    return kept, raws


def join(head: bytes, field: int, tensors: Sequence[tuple[bytes, Any]], inner: int | None = None,
         padding: int | None = None, align: int = 16) -> bytes:
    """A serialized message: ``head`` (the message serialized without its tensors) followed by the tensors.

    Each tensor is ``(meta, data)``: ``data`` any C-contiguous buffer (a numpy array), copied once, straight into
    the result. Without ``inner``, ``field`` is a repeated bytes field and ``meta`` must be empty. With ``inner``,
    ``field`` is a repeated message field, ``meta`` the element serialized without its bytes field ``inner``, and
    the bytes are appended as that field. Parsing the result gives the same message as setting the fields and
    serializing (protobuf accepts fields in any order and appends repeated ones in the order they come).
    ``padding``: a bytes field of the message (one the receiver ignores) filled so that the first tensor's bytes
    start at a multiple of ``align`` (< 128) from the start of the message.
    """
    records: list[list[Any]] = []
    for meta, data in tensors:
        size = memoryview(data).nbytes
        if inner is None:
            records.append([_key(field, _LEN), _encode_varint(size), data])
        else:
            body = len(meta) + len(_key(inner, _LEN)) + len(_encode_varint(size)) + size
            records.append([_key(field, _LEN), _encode_varint(body), meta, _key(inner, _LEN), _encode_varint(size),
                            data])
    parts: list[Any] = [head]
    if padding is not None and records:
        key = _key(padding, _LEN)
        before = len(head) + len(key) + 1 + sum(len(p) for p in records[0][:-1])
        fill = -before % align  # < 128: its length is one varint byte, as counted in ``before``
        parts += (key, _encode_varint(fill), bytes(fill))
    for record in records:
        parts += record
    return b"".join(parts)
