"""The one boundary between Open Inference Protocol (KServe V2, package ``inference``) messages and numpy/domain.

Inputs are read without per-element copies when they come as ``raw_input_contents`` (a numpy view of the
message's bytes); typed ``contents`` are accepted too. Outputs always go out as ``raw_output_contents`` (one
``tobytes`` per output).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from leanserve.client import codec
from leanserve.client.wire import trailing_record
from leanserve.v2 import grpc_service_pb2 as pb
from leanserve.server.errors import InvalidArgument
from leanserve.server.serving.model import PredictResult, ServedModel, TensorSignature
from leanserve.server.serving.postprocess import PostProcess
from leanserve.server.serving.stats import StatsSnapshot
from leanserve.server.serving.validation import MAX_TENSOR_DIMS, check_rank, tensor_shape

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_V2_NAMES: dict[str, str] = {dtype.name: name for name, dtype in DTYPES.items()}
_V2_BY_DTYPE: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# which InferTensorContents field carries each datatype, and that field's element type
_CONTENTS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype("?")),
    "INT8": ("int_contents", np.dtype("i4")),
    "INT16": ("int_contents", np.dtype("i4")),
    "INT32": ("int_contents", np.dtype("i4")),
    "INT64": ("int64_contents", np.dtype("i8")),
    "UINT8": ("uint_contents", np.dtype("u4")),
    "UINT16": ("uint_contents", np.dtype("u4")),
    "UINT32": ("uint_contents", np.dtype("u4")),
    "UINT64": ("uint64_contents", np.dtype("u8")),
    "FP32": ("fp32_contents", np.dtype("f4")),
    "FP64": ("fp64_contents", np.dtype("f8")),
}
_POSTPROCESS = {p.value: p for p in PostProcess}
#: no tensor larger than the largest message can arrive; the default when a caller names no cap
_MAX_TENSOR_BYTES = 2**63 - 1
_ECHO = 64  # characters of a client-sent name echoed in an error message


#: Triton's stream option (tritonclient ``enable_empty_final_response``): every answer then carries
#: ``triton_final_response``, true on a request's last one; here each request has exactly one answer, always last
FINAL_FLAG_OPTION = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"


def wants_final_flag(req: pb.ModelInferRequest) -> bool:
    """Whether a stream request asked for Triton's final-response flag on its answers."""
    params = req.parameters
    return bool(params) and FINAL_FLAG_OPTION in params and params[FINAL_FLAG_OPTION].bool_param


class InferCall(NamedTuple):
    """A ModelInferRequest in domain terms (a tuple: one is built per request)."""

    model_name: str
    version: int | None
    inputs: dict[str, np.ndarray]
    postprocess: PostProcess
    top_k: int
    outputs: tuple[str, ...]
    id: str
    #: Triton's ``timeout`` request parameter (µs, 0 = none): the request must be answered within it
    timeout_us: int = 0


#: (datatype, dims) already checked -> (dtype, shape, element count, bytes); filled by the first request of each
#: signature so the next ones skip the checks; bounded, as clients choose the keys
_CHECKED: dict[tuple[str, tuple[int, ...]], tuple[np.dtype, tuple[int, ...], int, int]] = {}
_CHECKED_MAX = 4096


def parse_version(version: str) -> int | None:
    """V2 versions are strings: "" = latest, else a positive decimal number."""
    if not version:
        return None
    # str.isdigit() also accepts digits such as "²" that int() refuses: only ASCII digits, and at most 18 of them
    if not (version.isascii() and version.isdigit() and len(version) <= 18) or int(version) == 0:
        raise InvalidArgument(f"model version must be a positive number or empty, got {version[:_ECHO]!r}")
    return int(version)


def v2_datatype(dtype: str | np.dtype) -> str:
    """The V2 datatype name of a numpy dtype ("float32" -> "FP32")."""
    name = _V2_BY_DTYPE.get(dtype) if isinstance(dtype, np.dtype) else None  # dtype.name is a slow property
    name = name or _V2_NAMES.get(np.dtype(dtype).name)
    if name is None:
        raise InvalidArgument(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def _signature(t: pb.ModelInferRequest.InferInputTensor, max_bytes: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and element count of an input tensor, checked (see ``tensor_shape``) before anything is
    allocated."""
    if len(t.shape) > MAX_TENSOR_DIMS:  # before the key: a tuple of millions of dims is itself the attack
        check_rank(t.name[:_ECHO], len(t.shape))
    key = (t.datatype, tuple(t.shape[:]))
    known = _CHECKED.get(key)
    if known is None:
        dtype = DTYPES.get(key[0])
        if dtype is None:
            raise InvalidArgument(f"input {t.name[:_ECHO]!r}: unsupported datatype {key[0][:_ECHO]!r}")
        shape, count = tensor_shape(t.name[:_ECHO], key[1], dtype.itemsize, _MAX_TENSOR_BYTES)
        # a 0 dimension counts as 1 against the cap, as in tensor_shape
        known = (dtype, shape, count, math.prod(d or 1 for d in shape) * dtype.itemsize)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = known
    if known[3] > max_bytes:
        raise InvalidArgument(f"tensor {t.name[:_ECHO]!r}: shape {list(known[1])} describes more than "
                              f"{max_bytes} bytes")
    return known[0], known[1], known[2]


def _tensor(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, max_bytes: int) -> np.ndarray:
    if t.parameters:
        # none is served (shared memory among them): refused rather than ignored
        raise InvalidArgument(f"input {t.name[:_ECHO]!r}: input parameters ({', '.join(sorted(t.parameters))[:_ECHO]}) "
                              "are not supported; send the tensor in raw_input_contents or contents")
    dtype, shape, count = _signature(t, max_bytes)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {t.name[:_ECHO]!r}: shape {list(shape)} of {t.datatype} needs {count * dtype.itemsize} bytes, "
                f"got {len(raw)}"
            )
        return codec.view(shape, dtype, raw)
    if t.datatype not in _CONTENTS:
        raise InvalidArgument(f"input {t.name[:_ECHO]!r}: {t.datatype} must be sent in raw_input_contents")
    field, wire_dtype = _CONTENTS[t.datatype]
    values = getattr(t.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input {t.name[:_ECHO]!r}: shape {list(shape)} needs {count} elements, got {len(values)}"
        )
    a = np.fromiter(values, dtype=wire_dtype, count=count)
    if dtype.kind in "iu" and dtype.itemsize < wire_dtype.itemsize and a.size:
        # INT8/INT16/UINT8/UINT16 travel in 32-bit fields: a value out of range must not wrap around silently
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise InvalidArgument(f"input {t.name[:_ECHO]!r}: a value is outside the range of {t.datatype} "
                                  f"({info.min}..{info.max})")
    return a.astype(dtype, copy=False).reshape(shape)


def _inputs(tensors: Iterable[pb.ModelInferRequest.InferInputTensor], raws: list[bytes],
            max_bytes: int) -> dict[str, np.ndarray]:
    tensors = list(tensors)
    if raws and len(raws) != len(tensors):
        raise InvalidArgument(f"raw_input_contents has {len(raws)} entries for {len(tensors)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        name = t.name
        if name in inputs:
            raise InvalidArgument(f"input {name[:_ECHO]!r} given twice")
        if raws and t.HasField("contents"):
            raise InvalidArgument(f"input {name[:_ECHO]!r}: contents and raw_input_contents must not both be used")
        inputs[name] = _tensor(t, raws[i] if raws else None, max_bytes)
    return inputs


def infer_request(req: pb.ModelInferRequest, max_bytes: int = _MAX_TENSOR_BYTES,
                  raws: list[Any] | None = None) -> InferCall:
    """Inputs by name, options from the request parameters, requested output names. No input tensor may describe
    more than ``max_bytes`` (the largest message). ``raws``: the ``raw_input_contents`` when ``request_decoders``
    took them out of the message (None: the message holds them)."""
    tensors = req.inputs
    raw_field = req.raw_input_contents if raws is None else raws
    if len(tensors) == 1 and len(raw_field) == 1:  # the usual request: one input, raw (no list, no loop)
        t = tensors[0]
        if t.HasField("contents"):
            raise InvalidArgument(f"input {t.name[:_ECHO]!r}: contents and raw_input_contents must not both be used")
        inputs = {t.name: _tensor(t, raw_field[0], max_bytes)}
    else:
        inputs = _inputs(tensors, raw_field[:], max_bytes)  # one list: each indexing copies the bytes again
    kind, top_k, timeout_us = PostProcess.RAW, 0, 0
    params = req.parameters
    if params:
        if "postprocess" in params:
            kind = _POSTPROCESS.get(_param(params, "postprocess", ("string_param",)))
            if kind is None:
                raise InvalidArgument(f"parameter postprocess must be one of {', '.join(_POSTPROCESS)}")
        if "top_k" in params:
            top_k = int(_param(params, "top_k", ("int64_param", "uint64_param")))
            if top_k < 0:
                raise InvalidArgument("top_k must not be negative")
        if "timeout" in params:
            timeout_us = int(_param(params, "timeout", ("int64_param", "uint64_param")))
            if timeout_us < 0:
                raise InvalidArgument("timeout must not be negative")
        if FINAL_FLAG_OPTION in params:
            _param(params, FINAL_FLAG_OPTION, ("bool_param",))
        if len(params) > ("postprocess" in params) + ("top_k" in params) + ("timeout" in params) + (
                FINAL_FLAG_OPTION in params):
            _refuse_unknown(params)
    outputs = _requested_outputs(req.outputs) if req.outputs else ()
    return InferCall(req.model_name, parse_version(req.model_version), inputs, kind, top_k, outputs, req.id,
                     timeout_us)


#: request parameters this server acts on; any other is refused rather than ignored (Triton's ``priority`` and
#: ``sequence_*`` have no meaning here: no priority levels, no stateful models)
_REQUEST_PARAMETERS = ("postprocess", "top_k", "timeout", FINAL_FLAG_OPTION)


def _refuse_unknown(params: Any) -> None:
    unknown = sorted(name for name in params if name not in _REQUEST_PARAMETERS)
    if unknown:
        raise InvalidArgument(f"request parameters {', '.join(unknown)[:_ECHO]} are not supported "
                              f"(supported: {', '.join(_REQUEST_PARAMETERS)})")


def _param(params: Any, name: str, kinds: tuple[str, ...]) -> Any:
    """The value of request parameter ``name``, which must be set as one of ``kinds`` (a top_k sent as a string is
    refused rather than read as the int field's default)."""
    p = params[name]
    kind = p.WhichOneof("parameter_choice")
    if kind not in kinds:
        raise InvalidArgument(f"parameter {name} must be a{'n' if kinds[0][0] in 'aeiou' else ''} "
                              f"{' or '.join(k.removesuffix('_param') for k in kinds)}, got {kind or 'nothing'}")
    return getattr(p, kind)


def _requested_outputs(outputs: Any) -> tuple[str, ...]:
    """The names of the requested outputs: each once, with no per-output option this server would ignore (Triton's
    ``classification`` is not served; the ``postprocess`` request parameter is its equivalent)."""
    names: dict[str, None] = {}  # a dict, not a list: a request may name very many outputs
    for o in outputs:
        if o.name in names:
            raise InvalidArgument(f"output {o.name[:_ECHO]!r} requested twice")
        if o.parameters:
            raise InvalidArgument(f"output {o.name[:_ECHO]!r}: output parameters "
                                  f"({', '.join(sorted(o.parameters))[:_ECHO]}) are not supported; use the request "
                                  "parameters postprocess and top_k")
        names[o.name] = None
    return tuple(names)


def infer_response(result: PredictResult, call: InferCall) -> pb.ModelInferResponse:
    """Requested outputs (all when none requested) as raw little-endian bytes."""
    return fill_infer_response(pb.ModelInferResponse(), result, call)


#: (model, version, id, output name, dtype number and size, shape) -> a one-output response serialized up to its
#: tensor's bytes
_HEADS: dict[tuple[Any, ...], bytes] = {}
_HEADS_MAX = 1024
#: longer headers (a long id, say) are not kept: the cache holds a few MiB at most (its keys hold the id too)
_HEAD_MAX_BYTES = 4096
_RAW_OUTPUT_FIELD = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


def infer_response_bytes(result: PredictResult, call: InferCall) -> bytes:
    """``infer_response(result, call)`` serialized. A response of one output is its header, serialized once per
    (model, version, id, output, dtype, shape), followed by the tensor's record: protobuf reads a concatenation of
    serialized messages as one message with the fields of both, so the bytes are the same message."""
    outputs = result.outputs
    if len(outputs) != 1 or (call.outputs and call.outputs != tuple(outputs)):
        return infer_response(result, call).SerializeToString()
    [(name, a)] = outputs.items()
    if not a.dtype.isnative or not a.flags.c_contiguous:
        return infer_response(result, call).SerializeToString()
    key = (result.model_name, result.model_version, call.id, name, a.dtype.num, a.itemsize, a.shape)
    head = _HEADS.get(key)
    if head is not None:
        return head + a.data
    data = infer_response(result, call).SerializeToString()
    raw = a.tobytes()
    # kept when the tensor is the last field (as upb writes it) and the header is short
    if len(data) - len(raw) <= _HEAD_MAX_BYTES and trailing_record(data, _RAW_OUTPUT_FIELD, raw) is not None:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[key] = data[:len(data) - len(raw)]
    return data


def fill_infer_response(resp: pb.ModelInferResponse, result: PredictResult, call: InferCall) -> pb.ModelInferResponse:
    """``infer_response`` written into ``resp`` (e.g. a stream response's field: a finished message passed to a
    parent's constructor is deep-copied)."""
    resp.model_name = result.model_name
    resp.model_version = str(result.model_version)
    resp.id = call.id
    for name in call.outputs or result.outputs:
        a = result.outputs.get(name)
        if a is None:
            raise InvalidArgument(f"no output {name[:_ECHO]!r}; this request produces {', '.join(result.outputs)}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        out = resp.outputs.add()
        out.name = name
        out.datatype = v2_datatype(a.dtype)
        out.shape[:] = a.shape
        resp.raw_output_contents.append(a.tobytes())  # tobytes is C order whatever the array's layout
    return resp


def _tensor_metadata(sig: TensorSignature) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=sig.name, datatype=v2_datatype(sig.dtype),
                                                   shape=[-1, *sig.shape])


def model_metadata(model: ServedModel, versions: Iterable[int]) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=model.name, versions=[str(v) for v in versions], platform=f"leanserve_{model.runtime}",
        inputs=[_tensor_metadata(model.input)], outputs=[_tensor_metadata(model.output)],
    )


def model_statistics(model: ServedModel, s: StatsSnapshot) -> pb.ModelStatistics:
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=model.name, version=str(model.version), last_inference=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(count=s.success_count, ns=s.success_ns), fail=duration(count=s.fail_count, ns=s.fail_ns),
            queue=duration(count=s.queue_count, ns=s.queue_ns),
            compute_infer=duration(count=s.compute_count, ns=s.compute_ns),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=rows, compute_infer=duration(count=n, ns=ns))
            for rows, (n, ns) in sorted(s.batches.items())
        ],
    )


def repository_index(entries: Iterable[tuple[str, int, bool]], ready_only: bool) -> pb.RepositoryIndexResponse:
    Index = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            Index(name=name, version=str(version), state="READY" if served else "UNAVAILABLE",
                  reason="" if served else "unloaded")
            for name, version, served in entries
            if served or not ready_only
        ]
    )


def repository_load(req: pb.RepositoryModelLoadRequest) -> str:
    """The model a RepositoryModelLoad names. Triton's load-time overrides (``config``, ``file:`` contents) are
    refused, not ignored: a model here is what its stored version holds; publish or upload a new version instead."""
    check_repository_name(req.repository_name)
    if req.parameters:
        raise InvalidArgument(f"load parameters ({', '.join(sorted(req.parameters))[:_ECHO]}) are not supported: a "
                              "model is served as its stored version holds it; upload or publish a new version")
    return req.model_name


def repository_unload(req: pb.RepositoryModelUnloadRequest) -> str:
    """The model a RepositoryModelUnload names; tritonclient always sends ``unload_dependents``, which has nothing
    to act on here (no ensembles), so it is accepted as a bool and nothing else is."""
    check_repository_name(req.repository_name)
    params = req.parameters
    if params:
        unknown = sorted(set(params) - {"unload_dependents"})
        if unknown:
            raise InvalidArgument(f"unload parameters ({', '.join(unknown)[:_ECHO]}) are not supported")
        _param(params, "unload_dependents", ("bool_param",))
    return req.model_name


def check_repository_name(name: str) -> None:
    """One repository per server: a RepositoryIndex, Load or Unload naming one is refused, as Triton does."""
    if name:
        raise InvalidArgument(f"repository_name {name[:_ECHO]!r}: this server follows one repository; leave it empty")
