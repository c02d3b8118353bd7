"""Checking request tensors against a model's signature, with messages naming what was expected and got."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from leanserve.server.errors import InvalidArgument
from leanserve.server.serving.model import ServedModel


#: most dimensions a request tensor may have (numpy's own limit is 64)
MAX_TENSOR_DIMS = 32


def check_rank(name: str, ndims: int) -> None:
    """InvalidArgument when a request tensor has more than ``MAX_TENSOR_DIMS`` dimensions; called on the count
    before the dimensions are read, so a message of millions of them is refused without building anything."""
    if ndims > MAX_TENSOR_DIMS:
        raise InvalidArgument(f"tensor {name!r}: {ndims} dimensions; at most {MAX_TENSOR_DIMS} are allowed")


def tensor_shape(name: str, dims: Sequence[int], itemsize: int, max_bytes: int) -> tuple[tuple[int, ...], int]:
    """A request tensor's shape and element count, checked before anything is allocated: at most
    ``MAX_TENSOR_DIMS`` dimensions, none negative, and at most ``max_bytes`` of data (counted in Python integers,
    so no product wraps around; a 0 dimension counts as 1 here because numpy refuses such shapes past its size
    limit too)."""
    check_rank(name, len(dims))
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {name!r}: negative dimension in shape {list(shape)}")
    if math.prod(d or 1 for d in shape) * itemsize > max_bytes:
        raise InvalidArgument(f"tensor {name!r}: shape {list(shape)} describes more than {max_bytes} bytes")
    return shape, math.prod(shape)


def select_input(model: ServedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The one input tensor for ``model`` from named inputs (a single unnamed tensor is accepted too)."""
    if len(inputs) != 1:
        raise InvalidArgument(f"model {model.name!r} takes 1 input ({model.input.name!r}); got {len(inputs)}")
    (name, x), = inputs.items()
    if name not in ("", model.input.name):
        raise InvalidArgument(f"model {model.name!r} has no input {name!r}; its input is {model.input.name!r}")
    return x


def validate_batch(model: ServedModel, x: np.ndarray, max_batch_size: int) -> np.ndarray:
    """Check dtype, shape and batch size; return a C-contiguous array ready for the runner."""
    sig = model.input
    # x.ndim first: a 0-d tensor has the same shape[1:] as a model taking scalars per row, and no batch dimension
    if x.ndim and x.shape[1:] == sig.shape and x.dtype == sig.np_dtype and 1 <= x.shape[0] <= max_batch_size \
            and x.flags.c_contiguous:
        return x  # the usual request: exactly the signature
    if x.dtype != sig.np_dtype:
        raise InvalidArgument(f"input {sig.name!r} of model {model.name!r}: expected dtype {sig.dtype}, got {x.dtype}")
    expected = ["batch", *sig.shape]
    if x.ndim != len(sig.shape) + 1 or any(e not in (-1, g) for e, g in zip(sig.shape, x.shape[1:])):
        raise InvalidArgument(
            f"input {sig.name!r} of model {model.name!r}: expected shape {expected}, got {list(x.shape)}"
        )
    if not 1 <= x.shape[0] <= max_batch_size:
        raise InvalidArgument(
            f"input {sig.name!r} of model {model.name!r}: batch size must be 1..{max_batch_size}, got {x.shape[0]}"
        )
    return np.ascontiguousarray(x)
