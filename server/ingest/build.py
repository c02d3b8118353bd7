"""Turning an uploaded file into a stored, checked version: detect → convert → reference check → tune → files.

TensorFlow is imported only here (lazily, through server/convert and server/runtime/tf_runtime) and only for
Keras uploads; a server that serves Plans never loads it.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError

from leanserve.server.repository import artifacts
from leanserve.server.repository.manifest import (DTYPES, FORMAT_NAME, FORMAT_VERSION, Manifest, ManifestLimits,
                                                  TensorSpec, jsonable)
from leanserve.server.errors import (FailedPrecondition, InvalidArgument, LeanserveError, UnsupportedModel,
                                     brief)
from leanserve.server.ingest.archives import expansion_limit
from leanserve.server.serving.model import TensorSignature
from leanserve.server.ingest.uploads import UploadRequest
from leanserve.server.runtime.plan import Plan, build_plan
from leanserve.server.runtime.tuning import tune_plan
from leanserve.server.runtime.working_memory import (UNBOUNDED_ROWS, keras_bytes_per_row, max_rows,
                                                      plan_bytes_per_row)
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

FORMATS = ("keras", "h5", "leanserve")
REFERENCE_SAMPLE_BYTES = 64 * 1024 * 1024
SOURCE_NAMES = {"keras": "source.keras", "h5": "source.h5", "leanserve": "source.leanserve"}


@dataclass
class Converted:
    """What an upload became, before it is written."""

    runtime: str  # "plan" | "tensorflow"
    input: TensorSignature
    output: TensorSignature
    plan: Plan | None
    runner: Callable[[np.ndarray], np.ndarray]
    reference: Callable[[np.ndarray], np.ndarray]
    reference_name: str
    output_is_probability: bool
    conversion_note: str = ""
    #: the most rows one call may take (server/runtime/working_memory.py)
    max_rows: int = UNBOUNDED_ROWS


def detect(path: Path, declared: str) -> str:
    """The file's real format; InvalidArgument when unknown or different from what the header declared."""
    from leanserve.server.ingest.keras_loader import detect_format

    actual = detect_format(path)
    if actual not in FORMATS:
        raise InvalidArgument(
            "unrecognised model file: expected a Keras .keras zip, an HDF5 .h5 file or a leanserve file"
        )
    if declared and declared != actual:
        raise InvalidArgument(f"the header declares format {declared!r} but the file is {actual!r}")
    return actual


def convert(fmt: str, path: Path, settings: Settings) -> Converted:
    """Build the served form of an uploaded file."""
    if fmt == "leanserve":
        return _convert_leanserve(path, settings)
    return _convert_keras(path, settings)


def _convert_leanserve(path: Path, settings: Settings) -> Converted:
    limits = ManifestLimits.from_settings(settings)
    cap = expansion_limit(path.stat().st_size, settings.max_unpacked_bytes, settings.max_unpack_ratio)
    manifest, blob = artifacts.read_zip(path, cap, limits)
    plan = artifacts.plan_from_files(manifest, blob)
    rows = max_rows(plan_bytes_per_row(plan.in_features, [layer.out_features for layer in plan.layers]),
                    settings.max_activation_bytes, "model refused")
    return Converted(
        runtime="plan",
        input=TensorSignature(manifest.input.name, "float32", plan.input_shape),
        output=TensorSignature(manifest.output.name, "float32", (plan.out_features,)),
        plan=plan,
        runner=plan,
        reference=plan.reference,
        reference_name="numpy",
        output_is_probability=plan.layers[-1].activation == "softmax",
        max_rows=rows,
    )


def _convert_keras(path: Path, settings: Settings) -> Converted:
    from leanserve.server.ingest.keras_loader import load_keras, settings_limits
    from leanserve.server.ingest.keras_to_plan import keras_to_specs, model_signature
    from leanserve.server.ingest.reference import keras_reference

    model = load_keras(path, **settings_limits(path, settings))
    # before anything runs it: a small file may describe a model whose every row takes gigabytes to compute
    rows = max_rows(keras_bytes_per_row(model), settings.max_activation_bytes, "model refused")
    sig = model_signature(model)
    inp, out = _signature("input", sig["input"]), _signature("output", sig["output"])
    reference = keras_reference(model)
    try:
        input_shape, specs = keras_to_specs(model)
    except UnsupportedModel as exc:
        from leanserve.server.runtime.tf_runtime import TFRuntime

        log.info("model not expressible as a Plan (%s); serving it with TensorFlow", exc.message)
        try:
            runtime = TFRuntime(model)
        except LeanserveError:
            raise
        except Exception as err:  # noqa: BLE001 -- tracing fails on the file's model (e.g. a softmax over no axis)
            raise InvalidArgument(f"model refused: TensorFlow cannot run it: {brief(err, first_line=True)}") from None
        return Converted(
            runtime="tensorflow",
            input=inp,
            output=out,
            plan=None,
            runner=runtime,
            reference=reference,
            reference_name="keras",
            output_is_probability=_ends_in_softmax(model),
            conversion_note=exc.message,
            max_rows=rows,
        )
    plan = build_plan(input_shape, specs)
    return Converted(
        runtime="plan",
        input=inp,
        output=out,
        plan=plan,
        runner=plan,
        reference=reference,
        reference_name="keras",
        output_is_probability=specs[-1].activation == "softmax",
        max_rows=rows,
    )


def _signature(role: str, sig: dict[str, Any]) -> TensorSignature:
    """A Keras model's input or output as a served signature: a dtype the server serves (numbers and bool, never
    strings), an undefined dim as -1."""
    shape = [None if d is None else int(d) for d in sig["shape"]]
    try:
        spec = TensorSpec.model_validate({"name": str(sig["name"]), "dtype": str(sig["dtype"]), "shape": shape})
    except ValidationError:
        raise InvalidArgument(
            f"the model's {role} {str(sig['name'])[:100]!r} ({str(sig['dtype'])[:40]}, shape {shape}) cannot be "
            f"served: only tensors of {', '.join(DTYPES)} are"
        ) from None
    return TensorSignature(spec.name, spec.dtype, tuple(spec.shape))


def _ends_in_softmax(model: Any) -> bool:
    """Whether the model's output already is a softmax over its last axis (PROBABILITIES then answers it as it is,
    instead of applying a softmax over the classes)."""
    last = model.layers[-1]
    if type(last).__name__ == "Softmax":
        axis = last.get_config().get("axis", -1)
        if isinstance(axis, (list, tuple)):
            axis = axis[0] if len(axis) == 1 else None
        return isinstance(axis, int) and axis in (-1, len(model.outputs[0].shape) - 1)
    return getattr(getattr(last, "activation", None), "__name__", "") == "softmax"


def check_reference(conv: Converted, settings: Settings) -> dict[str, Any]:
    """Compare served outputs with the reference; FailedPrecondition when outside tolerance."""
    from leanserve.server.ingest.reference import reference_check

    # the sample rows of a model with very wide inputs are capped by bytes, not only by count
    dtype = conv.input.np_dtype
    row_bytes = dtype.itemsize * math.prod(max(d, 1) for d in conv.input.shape)
    report = reference_check(
        conv.runner,
        conv.reference,
        conv.input.shape,
        dtype=dtype,
        n=max(1, min(settings.reference_samples, REFERENCE_SAMPLE_BYTES // row_bytes)),
        seed=0,
        atol=settings.reference_atol,
        rtol=settings.reference_rtol,
        max_rows=conv.max_rows,
    ).to_dict()
    report["reference"] = conv.reference_name
    if not math.isfinite(report["max_abs_error"]):
        raise InvalidArgument(f"model refused: it computes NaN or infinite outputs from random inputs "
                              f"(served or {conv.reference_name} reference); its weights are not usable")
    if not report["within_tolerance"]:
        raise FailedPrecondition(
            f"model refused: served outputs differ from the {conv.reference_name} reference beyond tolerance "
            f"(max abs error {report['max_abs_error']:.3g}, max rel error {report['max_rel_error']:.3g}; "
            f"allowed atol={settings.reference_atol} rtol={settings.reference_rtol})"
        )
    return report


def write_version(
    staged: Path, req: UploadRequest, fmt: str, source: Path, conv: Converted, reference: dict[str, Any],
    settings: Settings | None = None,
) -> Manifest:
    """Write the version's files into ``staged`` and return its manifest."""
    shutil.move(str(source), staged / SOURCE_NAMES[fmt])
    fields: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if conv.plan is not None:
        plan_manifest, blob = artifacts.plan_manifest(conv.plan, conv.input.name, conv.output.name)
        with open(staged / artifacts.WEIGHTS, "wb") as f:
            f.write(blob)
        fields = plan_manifest.to_dict()
    fields.update(
        {
            "name": req.name,
            "runtime": conv.runtime,
            "input": conv.input.to_dict(),
            "output": conv.output.to_dict(),
            "output_is_probability": conv.output_is_probability,
            "source": {
                "format": fmt,
                "file": SOURCE_NAMES[fmt],
                "sha256": req.sha256,
                "size_bytes": req.size_bytes,
            },
            "reference": reference,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "description": req.description,
            "conversion_note": conv.conversion_note,
            "metadata": {},
        }
    )
    limits = ManifestLimits.from_settings(settings) if settings is not None else None
    manifest = Manifest.parse(jsonable(fields), limits)
    (staged / artifacts.MANIFEST).write_text(manifest.to_json())
    return manifest


def build(req: UploadRequest, source: Path, staged: Path, settings: Settings) -> tuple[Manifest, Converted]:
    """The whole pipeline for one received file; returns the manifest written into ``staged``."""
    fmt = detect(source, req.format)
    conv = convert(fmt, source, settings)
    if conv.plan is not None and settings.autotune:
        conv.plan = tune_plan(conv.plan, settings.autotune_batch_sizes)
        conv.runner = conv.plan
    # checked after tuning: what is compared is exactly what will serve
    reference = check_reference(conv, settings)
    manifest = write_version(staged, req, fmt, source, conv, reference, settings)
    return manifest, conv
