"""What the sync and asyncio clients share: message building, tensor conversion, channel options."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from leanserve.client import codec
from leanserve.v1 import inference_service_pb2 as inf_pb
from leanserve.v1 import model_service_pb2 as model_pb

DEFAULT_SERVER = "127.0.0.1:8500"
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024

POSTPROCESS = {"raw": inf_pb.RAW, "probabilities": inf_pb.PROBABILITIES, "top_k": inf_pb.TOP_K, "argmax": inf_pb.ARGMAX}
FORMATS = {"": model_pb.MODEL_FORMAT_UNSPECIFIED, "keras": model_pb.KERAS, "h5": model_pb.H5, "leanserve": model_pb.LEANSERVE}


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


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
    codec.fill(req.inputs.add(), x, input_name)
    return req


def outputs(resp: inf_pb.PredictResponse) -> dict[str, np.ndarray]:
    return {t.name: codec.to_numpy(t) for t in resp.outputs}


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
