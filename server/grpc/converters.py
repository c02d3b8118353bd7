"""The one boundary between leanserve.v1 protobuf messages and numpy / domain objects."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from leanserve.client import codec
from leanserve.v1 import inference_service_pb2 as inf_pb
from leanserve.v1 import model_service_pb2 as model_pb
from leanserve.v1 import tensor_pb2 as tensor_pb
from leanserve.server.errors import InvalidArgument
from leanserve.server.serving.model import PredictResult, ServedModel, TensorSignature
from leanserve.server.ingest.uploads import UploadRequest
from leanserve.server.serving.postprocess import PostProcess
from leanserve.server.serving.validation import MAX_TENSOR_DIMS, check_rank

_FORMATS = {model_pb.MODEL_FORMAT_UNSPECIFIED: "", model_pb.KERAS: "keras", model_pb.H5: "h5", model_pb.LEANSERVE: "leanserve"}
_PB_FORMATS = {v: k for k, v in _FORMATS.items() if v}

_POSTPROCESS = {
    inf_pb.RAW: PostProcess.RAW,
    inf_pb.PROBABILITIES: PostProcess.PROBABILITIES,
    inf_pb.TOP_K: PostProcess.TOP_K,
    inf_pb.ARGMAX: PostProcess.ARGMAX,
}


def tensor_to_numpy(t: tensor_pb.Tensor, data: Any = None) -> np.ndarray:
    """A read-only numpy view over the message's bytes (or ``data``, its bytes taken out of the message);
    InvalidArgument when the message is not a valid array."""
    if len(t.shape) > MAX_TENSOR_DIMS:
        check_rank(t.name[:64], len(t.shape))
    try:
        return codec.to_numpy(t, data=data)
    except codec.TensorCodecError as exc:
        raise InvalidArgument(str(exc)) from None


def fill_tensor(t: tensor_pb.Tensor, name: str, a: np.ndarray) -> tensor_pb.Tensor:
    """Write ``a`` into the already attached message ``t`` (see ``codec.fill``)."""
    try:
        return codec.fill(t, a, name)
    except codec.TensorCodecError as exc:
        raise InvalidArgument(str(exc)) from None


def numpy_to_tensor(name: str, a: np.ndarray) -> tensor_pb.Tensor:
    """A standalone Tensor message holding ``a``'s bytes."""
    return fill_tensor(tensor_pb.Tensor(), name, a)


def spec_to_pb(sig: TensorSignature) -> tensor_pb.TensorSpec:
    return tensor_pb.TensorSpec(name=sig.name, dtype=codec.dtype_to_pb(sig.dtype), shape=[-1, *sig.shape])


def upload_header(h: model_pb.UploadHeader) -> UploadRequest:
    if h.format not in _FORMATS:
        raise InvalidArgument(f"unknown model format value {h.format}")
    return UploadRequest(
        name=h.name, format=_FORMATS[h.format], size_bytes=h.size_bytes, sha256=h.sha256.lower(),
        description=h.description,
    )


def predict_request(req: inf_pb.PredictRequest, raws: list[Any] | None = None,
                    ) -> tuple[dict[str, np.ndarray], PostProcess, int]:
    """Inputs by name (unnamed allowed for a single input), post-processing and top_k. ``raws``: per input, its
    bytes when ``request_decoders`` took them out of the message (None: the message holds them)."""
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        if t.name in inputs:
            raise InvalidArgument(f"input {t.name!r} given twice")
        inputs[t.name] = tensor_to_numpy(t, raws[i] if raws else None)
    kind = _POSTPROCESS.get(req.postprocess)
    if kind is None:
        raise InvalidArgument(f"unknown postprocess value {req.postprocess}")
    if req.top_k < 0:
        raise InvalidArgument("top_k must not be negative")
    return inputs, kind, int(req.top_k)


def predict_response(result: PredictResult, request_id: str = "") -> inf_pb.PredictResponse:
    resp = inf_pb.PredictResponse(
        model_name=result.model_name, model_version=result.model_version, request_id=request_id
    )
    for name, a in result.outputs.items():
        fill_tensor(resp.outputs.add(), name, a)
    return resp


def model_info(info: dict[str, Any], model: ServedModel) -> model_pb.ModelInfo:
    """GetModel's answer: the version's typed manifest plus the dataplane's live facts in ``info``."""
    manifest = model.manifest
    ref, source = manifest.reference, manifest.source
    layers = []
    for layer in info.get("layers_served", []):
        tuning = layer.get("tuning") or {}
        timings = [
            model_pb.FormatTiming(format=fmt, batch_size=int(batch), seconds=float(sec))
            for fmt, per_batch in (tuning.get("timings") or {}).items()
            for batch, sec in per_batch.items()
        ]
        layers.append(
            model_pb.LayerInfo(
                name=layer["name"], format=layer["format"], in_features=layer["in_features"],
                out_features=layer["out_features"], activation=layer["activation"], sparsity=layer["sparsity"],
                size_bytes=layer["bytes"], timings=timings, options_json=json.dumps(tuning.get("options") or {}),
            )
        )
    return model_pb.ModelInfo(
        name=model.name,
        version=model.version,
        versions=info.get("versions", []),
        runtime=model.runtime,
        source_format=_PB_FORMATS.get(source.format if source else "", model_pb.MODEL_FORMAT_UNSPECIFIED),
        inputs=[spec_to_pb(model.input)],
        outputs=[spec_to_pb(model.output)],
        layers=layers,
        reference=model_pb.ReferenceCheck() if ref is None else model_pb.ReferenceCheck(
            reference=ref.reference, samples=ref.n, max_abs_error=ref.max_abs_error, max_rel_error=ref.max_rel_error,
            atol=ref.atol, rtol=ref.rtol, passed=ref.within_tolerance,
        ),
        source_size_bytes=(source.size_bytes or 0) if source else 0,
        source_sha256=(source.sha256 or "") if source else "",
        created_at=manifest.created_at or "",
        max_batch_size=int(info.get("max_batch_size", 0)),
        description=manifest.description or "",
        served_size_bytes=int(info.get("served_size_bytes", 0)),
        metadata_json=json.dumps(manifest.metadata or {}, sort_keys=True),
        default_version=int(info.get("default_version", 0)),
    )
