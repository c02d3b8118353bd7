"""The one manifest schema: what every stored version (and every uploaded ``.leanserve`` file) says about itself.

``Manifest.parse`` is the only way a manifest is read and every writer builds its manifest through it, so a file on
disk, an upload and what the server holds in memory obey the same rules. Parsing is strict (no coercion, no unknown
keys) and checks what the kernels and the request path rely on before anything is allocated: dims are non-negative
(``-1`` marks a dynamic dim of a TensorFlow-served signature), products of dims are computed with Python ints
against the limits, layer formats are known and chain, dtypes come from an allow-list. Any failure is
``InvalidArgument``. The JSON layout is the one written before this schema existed (keys left out when unset), so
existing repositories read unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, JsonValue, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from leanserve.kernels import ACTIVATIONS, available_formats
from leanserve.server.errors import InvalidArgument

FORMAT_NAME = "leanserve"
FORMAT_VERSION = 1
#: dtypes a signature may name: plain numbers and bool (what the request codec and numpy both understand)
DTYPES = ("bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
          "uint64")
_ITEMSIZE = {"bool": 1, "float16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
             "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8}
#: no product of dims may reach this, whatever the settings (it and its multiples by 8 fit int64)
MAX_ELEMENTS = 2**59
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MAX_ERRORS_SHOWN = 3


@dataclass(frozen=True)
class ManifestLimits:
    """Caps a manifest is checked against (from the settings); ``None`` = only the int64-safety bounds."""

    max_params: int | None = None
    max_layers: int | None = None
    #: largest single input or output row in bytes (a row must fit in one message)
    max_row_bytes: int | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "ManifestLimits":
        return cls(settings.max_model_params, settings.max_model_layers, settings.max_message_bytes)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output: name, dtype, shape without the batch dim (``-1`` = any size, TensorFlow runtime only)."""

    name: str = Field(max_length=1024)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: list[int] = Field(max_length=32)

    @field_validator("shape", mode="before")
    @classmethod
    def _null_is_dynamic(cls, shape: Any) -> Any:
        # Keras reports an undefined dim as None; manifests written before this schema kept it as null
        return [-1 if d is None else d for d in shape] if isinstance(shape, list) else shape

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int], info: ValidationInfo) -> list[int]:
        if any(d < -1 for d in shape):
            raise ValueError(f"dims must be >= 0 (or -1 for a dynamic dim), got {shape}")
        return shape

    @property
    def elements(self) -> int:
        """Elements of one row, counting a dynamic dim as 1."""
        return math.prod(max(d, 1) for d in self.shape)


class LayerMeta(_Strict):
    """A layer's kernel options, as its ``LayerKernel.meta()`` wrote them."""

    activation: Literal[ACTIVATIONS]  # type: ignore[valid-type]
    in_features: int = Field(ge=1, le=2**31 - 1)
    out_features: int = Field(ge=1, le=2**31 - 1)
    format: str | None = None
    numpy_min_batch: int | None = Field(None, ge=1)
    path: Literal["auto", "vnni", "avx2", "portable"] | None = None
    block: list[int] | None = Field(None, min_length=2, max_length=2)


class Tuning(_Strict):
    """The autotuner's record for one layer: chosen format, its options, seconds per batch size per candidate."""

    chosen: str | None = None
    options: dict[str, JsonValue] | None = None
    timings: dict[str, dict[str, float]] | None = None


class LayerEntry(_Strict):
    """One layer of a Plan: its format, options, which safetensors keys hold its arrays, and its tuning record."""

    name: str = Field(max_length=1024)
    format: str
    meta: LayerMeta
    tensors: dict[str, str]
    tuning: Tuning = Tuning()

    @field_validator("format")
    @classmethod
    def _known_format(cls, fmt: str) -> str:
        if fmt not in available_formats():
            raise ValueError(f"unknown layer format {fmt!r}; known: {', '.join(available_formats())}")
        return fmt


class Source(_Strict):
    """Where a version came from: an uploaded file (kept beside it) or an optimization of another version."""

    format: Literal["keras", "h5", "leanserve", "optimized"]
    file: str | None = None
    sha256: str | None = None
    size_bytes: int | None = Field(None, ge=0)
    from_version: int | None = Field(None, ge=1)

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, file: str | None) -> str | None:
        # the loader opens version_folder / file: a name, never a path
        if file is not None and (not _FILE_RE.match(file) or file in (".", "..")):
            raise ValueError(f"source file must be a plain file name, got {file!r}")
        return file


class ReferenceRecord(_Strict):
    """The reference check a version passed when it was stored."""

    reference: str
    n: int = Field(ge=0)
    max_abs_error: float
    max_rel_error: float
    within_tolerance: bool
    atol: float
    rtol: float
    seed: int | None = None


#: longest description a new version may carry: it is stored in every manifest and returned by every GetModel
MAX_DESCRIPTION_CHARS = 4096


def check_description(text: str) -> None:
    """InvalidArgument for a description longer than ``MAX_DESCRIPTION_CHARS`` (checked before anything is
    stored; manifests already stored are read as they are)."""
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(f"description of {len(text)} characters; at most {MAX_DESCRIPTION_CHARS} are allowed")


class Manifest(_Strict):
    """A version's ``manifest.json`` (also the manifest inside an uploaded ``.leanserve`` zip, which carries only
    the format, signature, layers and weights checksum)."""

    format: Literal["leanserve"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION  # only 1: checked (with format) before the fields, see _ours
    name: str | None = None
    runtime: Literal["plan", "tensorflow"] | None = None
    input: TensorSpec
    output: TensorSpec
    layers: list[LayerEntry] | None = None
    weights_sha256: str | None = None
    output_is_probability: bool | None = None
    source: Source | None = None
    reference: ReferenceRecord | None = None
    created_at: str | None = None
    description: str | None = None
    conversion_note: str | None = None
    metadata: dict[str, JsonValue] | None = None
    batching: dict[str, JsonValue] | None = None

    @model_validator(mode="before")
    @classmethod
    def _ours(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("format", FORMAT_NAME), data.get("format_version", FORMAT_VERSION)) != (
                FORMAT_NAME, FORMAT_VERSION):
            raise ValueError(f"not a leanserve v{FORMAT_VERSION} manifest (format={str(data.get('format'))[:40]!r}, "
                             f"format_version={str(data.get('format_version'))[:20]!r})")
        return data

    @field_validator("weights_sha256")
    @classmethod
    def _hex_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA_RE.match(digest):
            raise ValueError("weights_sha256 must be 64 lowercase hex characters")
        return digest

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "Manifest":
        limits = (info.context or {}).get("limits") or ManifestLimits()
        for role, spec in (("input", self.input), ("output", self.output)):
            row_elements = spec.elements
            if row_elements > MAX_ELEMENTS:
                raise ValueError(f"{role} shape {spec.shape} has more elements than can be addressed")
            row_bytes = row_elements * _ITEMSIZE[spec.dtype]
            if limits.max_row_bytes is not None and row_bytes > limits.max_row_bytes:
                raise ValueError(f"one {role} row of shape {spec.shape} takes {row_bytes} bytes; the limit is "
                                 f"{limits.max_row_bytes} (max_message_bytes)")
        if self.runtime == "tensorflow" and (self.source is None or self.source.file is None):
            raise ValueError("a tensorflow-runtime version needs source.file")
        if self.runtime == "plan" and self.layers is None:
            raise ValueError("a plan-runtime version needs layers")
        if self.layers is not None:
            self._check_plan(limits)
        return self

    def _check_plan(self, limits: ManifestLimits) -> None:
        layers = self.layers or []
        if not layers:
            raise ValueError("a leanserve model needs at least one layer")
        if limits.max_layers is not None and len(layers) > limits.max_layers:
            raise ValueError(f"model has {len(layers)} layers; the limit is {limits.max_layers}")
        if any(d < 1 for d in self.input.shape):
            raise ValueError(f"a Plan's input dims must all be >= 1, got {self.input.shape}")
        expected, params = math.prod(self.input.shape), 0
        for entry in layers:
            meta = entry.meta
            if meta.in_features != expected:
                raise ValueError(f"layer {entry.name!r} expects {meta.in_features} inputs but the previous layer "
                                 f"gives {expected}")
            if meta.format is not None and meta.format != entry.format:
                raise ValueError(f"layer {entry.name!r}: meta.format {meta.format!r} differs from format "
                                 f"{entry.format!r}")
            if entry.format.startswith("bsr") != (meta.block is not None):
                raise ValueError(f"layer {entry.name!r}: meta.block is required for bsr formats and only for them")
            params += (meta.in_features + 1) * meta.out_features
            expected = meta.out_features
        cap = MAX_ELEMENTS if limits.max_params is None else min(MAX_ELEMENTS, limits.max_params)
        if params > cap:
            raise ValueError(f"model has {params} parameters; the limit is {cap}")
        # what the Plan takes and returns: float32 [B, *input.shape] in, float32 [B, last out_features] out
        for role, spec in (("input", self.input), ("output", self.output)):
            if spec.dtype != "float32":
                raise ValueError(f"{role} dtype is {spec.dtype} but the layers compute in float32")
        if self.output.shape != [expected]:
            raise ValueError(f"output shape {self.output.shape} differs from what the last layer "
                             f"{layers[-1].name!r} gives: [{expected}]")

    # -- reading and writing ----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes | str | Mapping[str, Any], limits: ManifestLimits | None = None) -> "Manifest":
        """Validate a manifest (JSON text or an already decoded object); ``InvalidArgument`` when it is not one."""
        context = {"limits": limits}
        try:
            if isinstance(data, (bytes, bytearray, str)):
                return cls.model_validate_json(data, context=context)
            if not isinstance(data, Mapping):
                raise InvalidArgument(f"invalid manifest: expected a JSON object, got {type(data).__name__}")
            return cls.model_validate(dict(data), context=context)
        except ValidationError as exc:
            raise InvalidArgument(f"invalid manifest: {_describe(exc)}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (unset keys left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        """``manifest.json``'s text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_fields(self, **fields: Any) -> "Manifest":
        """A copy with ``fields`` replaced, validated again (``model_copy`` would not validate)."""
        return Manifest.parse(jsonable({**self.to_dict(), **fields}))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists, int dict keys become strings), as it would read back."""
    return json.loads(json.dumps(value))


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:_MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "manifest"
        parts.append(f"{where}: {err.get('msg', 'invalid')}"[:300])
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
