"""What the sync and asyncio clients share: message building, tensor conversion, channel options."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from leanserve.v1 import inference_service_pb2 as inf_pb
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import tensor_pb2 as tensor_pb

DEFAULT_SERVER = "127.0.0.1:8500"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024

_DTYPES = {
    tensor_pb.FLOAT32: np.dtype("<f4"), tensor_pb.FLOAT64: np.dtype("<f8"), tensor_pb.FLOAT16: np.dtype("<f2"),
    tensor_pb.INT8: np.dtype("i1"), tensor_pb.INT16: np.dtype("<i2"), tensor_pb.INT32: np.dtype("<i4"),
    tensor_pb.INT64: np.dtype("<i8"), tensor_pb.UINT8: np.dtype("u1"), tensor_pb.BOOL: np.dtype("?"),
}
_PB_BY_DTYPE = {v: k for k, v in _DTYPES.items()}
POSTPROCESS = {"raw": inf_pb.RAW, "probabilities": inf_pb.PROBABILITIES, "top_k": inf_pb.TOP_K, "argmax": inf_pb.ARGMAX}
FORMATS = {"": model_pb.MODEL_FORMAT_UNSPECIFIED, "keras": model_pb.KERAS, "h5": model_pb.H5, "leanserve": model_pb.LEANSERVE}


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def fill_tensor(t: tensor_pb.Tensor, a: np.ndarray, name: str = "") -> tensor_pb.Tensor:
    """Write ``a`` into the (already attached) message ``t``.

    Filling a tensor in place (``msg.inputs.add()``) is ~70x cheaper for large arrays than building a Tensor and
    passing it to the parent's constructor, which deep-copies the bytes through a slow path in upb.
    """
    a = np.require(a, requirements="C")  # unlike ascontiguousarray, keeps 0-d arrays 0-d
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    code = _PB_BY_DTYPE.get(a.dtype)  # keyed by dtype: ``dtype.name`` is a slow property
    if code is None:
        raise TypeError(f"unsupported dtype {a.dtype}")
    t.name = name
    t.dtype = code
    t.shape[:] = a.shape
    t.data = a.tobytes()
    return t


def to_tensor(a: np.ndarray, name: str = "") -> tensor_pb.Tensor:
    """A standalone Tensor message holding ``a``."""
    return fill_tensor(tensor_pb.Tensor(), a, name)


def from_tensor(t: tensor_pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=_DTYPES[t.dtype]).reshape(tuple(t.shape))


def predict_request(
    model: str, x: np.ndarray, *, version: int = 0, postprocess: str = "raw", top_k: int = 0,
    request_id: str = "", input_name: str = "",
) -> inf_pb.PredictRequest:
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESS)}")
    req = inf_pb.PredictRequest(
        model_name=model, model_version=version, postprocess=POSTPROCESS[postprocess], top_k=top_k,
        request_id=request_id,
    )
    fill_tensor(req.inputs.add(), x, input_name)
    return req


def outputs(resp: inf_pb.PredictResponse) -> dict[str, np.ndarray]:
    return {t.name: from_tensor(t) for t in resp.outputs}


def detect_format(path: Path) -> str:
    """Format from the file name (the server checks the content too)."""
    suffix = path.suffix.lower()
    return {".keras": "keras", ".h5": "h5", ".hdf5": "h5", ".leanserve": "leanserve"}.get(suffix, "")


def upload_messages(
    path: Path, name: str, *, fmt: str = "", description: str = "", progress: Callable[[int], None] | None = None
) -> Iterator[model_pb.UploadModelRequest]:
    """Header then 1 MiB chunks; the sha256 is computed in a first pass so the header carries it."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    size = path.stat().st_size
    header = model_pb.UploadHeader(
        name=name, format=FORMATS[fmt or detect_format(path)], size_bytes=size, sha256=digest.hexdigest(),
        description=description,
    )
    yield model_pb.UploadModelRequest(header=header)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            yield model_pb.UploadModelRequest(chunk=block)
            if progress:
                progress(len(block))
