"""Loading a stored version from the repository into a ready ``ServedModel`` (warmed: no request pays a JIT).

Nothing in a version folder is trusted: the manifest is parsed strictly (its errors name it), its signature must be
what the runtime computes (the Plan's layers, or the TensorFlow model's own signature), and a file is read only once
it is known to be a regular file inside the folder of the size its manifest allows (a symlink to /dev/zero or a
sparse giant is refused before a byte is allocated).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import artifacts
from leanserve.server.repository.manifest import Manifest, ManifestLimits, TensorSpec
from leanserve.server.repository.store import MANIFEST
from leanserve.server.runtime.plan import Plan
from leanserve.server.runtime.working_memory import keras_bytes_per_row, max_rows, plan_bytes_per_row
from leanserve.server.serving.model import ServedModel, TensorSignature
from leanserve.server.settings import Settings

if TYPE_CHECKING:
    from leanserve.server.runtime.tf_runtime import TFRuntime

log = logging.getLogger(__name__)


def signature(spec: TensorSpec) -> TensorSignature:
    """The serving signature of a manifest's input or output."""
    return TensorSignature(spec.name, spec.dtype, tuple(spec.shape))


def _typed(manifest: Manifest | Mapping[str, Any], settings: Settings) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    return Manifest.parse(manifest, ManifestLimits.from_settings(settings))


def served_from_plan(name: str, version: int, manifest: Manifest | Mapping[str, Any], plan: Plan,
                     settings: Settings) -> ServedModel:
    """Wrap an in-memory Plan (already built and checked) as a served version."""
    manifest = _typed(manifest, settings)
    if (list(plan.input_shape), plan.out_features) != (manifest.input.shape, math.prod(manifest.output.shape)):
        raise InvalidArgument(f"model {name!r} version {version}: the manifest's signature (input "
                              f"{manifest.input.shape}, output {manifest.output.shape}) differs from the plan's "
                              f"(input {list(plan.input_shape)}, output [{plan.out_features}])")
    rows = max_rows(plan_bytes_per_row(plan.in_features, [layer.out_features for layer in plan.layers]),
                    settings.max_activation_bytes, f"model {name!r} version {version}")
    plan.warmup(tuple(min(b, rows) for b in settings.warmup_batch_sizes))
    return ServedModel(
        name=name,
        version=version,
        runtime="plan",
        input=signature(manifest.input),
        output=signature(manifest.output),
        manifest=manifest,
        runner=plan,
        output_is_probability=bool(manifest.output_is_probability),
        plan=plan,
        max_rows=rows,
    )


def load_version(name: str, version: int, path: Path, manifest: Manifest | Mapping[str, Any],
                 settings: Settings) -> ServedModel:
    """Build the runtime a stored version names (a Plan from its safetensors, or TensorFlow from its source).
    The manifest is checked against the settings' limits first; a malformed one is ``InvalidArgument``."""
    limits = ManifestLimits.from_settings(settings)
    try:
        manifest = Manifest.parse(manifest.to_dict() if isinstance(manifest, Manifest) else manifest, limits)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{MANIFEST} of {name!r} version {version}: {exc.message}") from None
    if manifest.runtime == "plan":
        blob = artifacts.read_weights(path, manifest, settings.max_repository_bytes)
        plan = artifacts.plan_from_files(manifest, blob)
        return served_from_plan(name, version, manifest, plan, settings)
    if manifest.runtime != "tensorflow" or manifest.source is None or manifest.source.file is None:
        raise InvalidArgument(f"model {name!r} version {version}: the manifest names no runtime to load")
    from leanserve.server.ingest.keras_loader import settings_limits
    from leanserve.server.runtime.tf_runtime import TFRuntime

    source = path / manifest.source.file
    fd = artifacts.open_stored_file(path, manifest.source.file)  # a regular file inside the folder
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if manifest.source.size_bytes is not None and size != manifest.source.size_bytes:
        raise InvalidArgument(f"{artifacts.stored_name(path, manifest.source.file)} is {size} bytes but the "
                              f"manifest records {manifest.source.size_bytes}")
    runtime = TFRuntime.from_path(source, **settings_limits(source, settings))
    _check_tf_signature(name, version, manifest, runtime)
    rows = max_rows(keras_bytes_per_row(runtime.model), settings.max_activation_bytes,
                    f"model {name!r} version {version}")
    runtime.warmup(tuple(min(b, rows) for b in (1, 8)))
    return ServedModel(
        name=name,
        version=version,
        runtime="tensorflow",
        input=signature(manifest.input),
        output=signature(manifest.output),
        manifest=manifest,
        runner=runtime,
        output_is_probability=bool(manifest.output_is_probability),
        max_rows=rows,
    )


def _check_tf_signature(name: str, version: int, manifest: Manifest, runtime: "TFRuntime") -> None:
    """InvalidArgument when the manifest's signature is not the TensorFlow model's own (dynamic dims as -1)."""
    for role, spec in (("input", manifest.input), ("output", manifest.output)):
        real = runtime.signature[role]
        shape = [-1 if d is None else int(d) for d in real["shape"]]
        if (spec.dtype, spec.shape) != (str(real["dtype"]), shape):
            raise InvalidArgument(f"model {name!r} version {version}: the manifest's {role} is {spec.dtype} "
                                  f"{spec.shape} but the model's is {real['dtype']} {shape}")
