"""The tensor codec: numpy arrays <-> ``leanserve.v1.Tensor`` messages, shared by the client and the server.

Tensors travel as raw little-endian, row-major bytes. Decoding never trusts the message: the dtype must be known,
every dimension non-negative, and the byte count exactly what the shape needs (computed with Python integers, so
a shape whose product overflows int64 is refused instead of wrapping around).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from leanserve.v1 import tensor_pb2 as tensor_pb

#: the wire dtypes and their numpy equivalents (explicitly little-endian)
DTYPES: dict[int, np.dtype] = {
    tensor_pb.FLOAT32: np.dtype("<f4"),
    tensor_pb.FLOAT64: np.dtype("<f8"),
    tensor_pb.FLOAT16: np.dtype("<f2"),
    tensor_pb.INT8: np.dtype("i1"),
    tensor_pb.INT16: np.dtype("<i2"),
    tensor_pb.INT32: np.dtype("<i4"),
    tensor_pb.INT64: np.dtype("<i8"),
    tensor_pb.UINT8: np.dtype("u1"),
    tensor_pb.BOOL: np.dtype("?"),
}
# keyed by the dtype object itself: ``dtype.name`` is built by a slow Python property on every access
_PB_BY_DTYPE: dict[np.dtype, int] = {v: k for k, v in DTYPES.items()}
_PB_BY_NAME: dict[str, int] = {v.name: k for k, v in DTYPES.items()}
#: the numpy dtype names that can travel as tensors (for messages naming what is accepted)
DTYPE_NAMES: tuple[str, ...] = tuple(v.name for v in DTYPES.values())


#: most dimensions a tensor can have (numpy's own limit): checked before the shape is read, so a message of millions
#: of dimensions costs nothing
MAX_DIMS = 64


class TensorCodecError(ValueError):
    """A tensor message that does not describe a valid array, or an array that cannot be sent."""


def dtype_to_pb(dtype: str | np.dtype) -> int:
    """The wire dtype of a numpy dtype (name or object); ``DATA_TYPE_UNSPECIFIED`` when it has none."""
    return _PB_BY_NAME.get(np.dtype(dtype).name, tensor_pb.DATA_TYPE_UNSPECIFIED)


def to_numpy(t: tensor_pb.Tensor, *, max_elements: int | None = None, data: Any = None) -> np.ndarray:
    """A read-only numpy view over the message's bytes (no per-element copy); ``TensorCodecError`` if invalid.

    ``data``: the tensor's bytes when the message does not hold them (a view ``wire.split`` took out of the
    received buffer); a view that is not aligned for the dtype is copied, so kernels only ever see aligned arrays.
    """
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise TensorCodecError(f"tensor {t.name[:64]!r}: unsupported or unset dtype ({t.dtype})")
    if len(t.shape) > MAX_DIMS:
        raise TensorCodecError(f"tensor {t.name[:64]!r}: {len(t.shape)} dimensions; an array has at most {MAX_DIMS}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"tensor {t.name[:64]!r}: negative dimension in shape {list(shape)[:8]}")
    count = math.prod(shape)  # Python ints: no wrap-around
    if max_elements is not None and count > max_elements:
        raise TensorCodecError(f"tensor {t.name[:64]!r}: shape {list(shape)[:8]} holds more than {max_elements} "
                               "elements")
    if data is None:
        data = t.data  # each attribute access copies the bytes out of the message: read it once
    needs = count * dtype.itemsize
    if len(data) != needs:
        # a hostile shape's product can have thousands of digits: never format more than fits in 64 bits
        shown = needs if needs < 2**64 else "more than 2**64"
        raise TensorCodecError(
            f"tensor {t.name[:64]!r}: shape {list(shape)[:8]} of {dtype.name} needs {shown} bytes, got {len(data)}"
        )
    try:
        return view(shape, dtype, data)
    except (ValueError, TypeError) as exc:  # e.g. a 0 beside dims numpy cannot address, or more than 64 dims
        raise TensorCodecError(f"tensor {t.name[:64]!r}: shape {list(shape)[:8]} is not a valid array: {exc}") from None


def fill(t: tensor_pb.Tensor, a: np.ndarray, name: str = "") -> tensor_pb.Tensor:
    """Write ``a`` (as little-endian, row-major bytes) into the already attached message ``t``.

    Filling in place (``msg.inputs.add()``) avoids the deep copy a parent's constructor makes of a finished
    Tensor, which for large arrays costs far more than the byte copy itself.
    """
    a, code = wire_array(a)
    t.name = name
    t.dtype = code
    t.shape[:] = a.shape
    t.data = a.tobytes()
    return t


def view(shape: tuple[int, ...], dtype: np.dtype, data: Any, offset: int = 0) -> np.ndarray:
    """``data`` (bytes, or a view of them) from ``offset`` on as a read-only array, as frombuffer + reshape but
    cheaper; copied when the bytes are not aligned for ``dtype`` (a view split off a received message), so kernels
    see aligned arrays only (Numba would compile an unaligned variant, numpy's BLAS path would be skipped). Count
    checked by the caller."""
    a = np.ndarray(shape, dtype, data, offset)
    return a if a.flags.aligned else a.copy()


def wire_array(a: np.ndarray) -> tuple[np.ndarray, int]:
    """``a`` as it travels (row-major, little-endian; the same array when it already is) and its wire dtype."""
    a = np.require(a, requirements="C")  # unlike ascontiguousarray, keeps 0-d arrays 0-d
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    code = _PB_BY_DTYPE.get(a.dtype)
    if code is None:
        raise TensorCodecError(f"cannot send dtype {a.dtype} as a tensor")
    return a, code


def from_numpy(a: np.ndarray, name: str = "") -> tensor_pb.Tensor:
    """A standalone Tensor message holding ``a``'s bytes."""
    return fill(tensor_pb.Tensor(), a, name)
