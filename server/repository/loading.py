"""Loading a stored version from the repository into a ready ``ServedModel`` (warmed: no request pays a JIT)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from leanserve.server.errors import InvalidArgument
from leanserve.server.repository import artifacts
from leanserve.server.repository.manifest import Manifest, ManifestLimits, TensorSpec
from leanserve.server.runtime.plan import Plan
from leanserve.server.serving.model import ServedModel, TensorSignature
from leanserve.server.settings import Settings

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
    plan.warmup(settings.warmup_batch_sizes)
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
    )


def load_version(name: str, version: int, path: Path, manifest: Manifest | Mapping[str, Any],
                 settings: Settings) -> ServedModel:
    """Build the runtime a stored version names (a Plan from its safetensors, or TensorFlow from its source).
    The manifest is checked against the settings' limits first; a malformed one is ``InvalidArgument``."""
    limits = ManifestLimits.from_settings(settings)
    manifest = Manifest.parse(manifest.to_dict() if isinstance(manifest, Manifest) else manifest, limits)
    if manifest.runtime == "plan":
        plan = artifacts.plan_from_files(manifest, (path / artifacts.WEIGHTS).read_bytes())
        return served_from_plan(name, version, manifest, plan, settings)
    if manifest.runtime != "tensorflow" or manifest.source is None or manifest.source.file is None:
        raise InvalidArgument(f"model {name!r} version {version}: the manifest names no runtime to load")
    from leanserve.server.ingest.keras_loader import settings_limits
    from leanserve.server.runtime.tf_runtime import TFRuntime

    source = path / manifest.source.file
    runtime = TFRuntime.from_path(source, **settings_limits(source, settings))
    runtime.warmup()
    return ServedModel(
        name=name,
        version=version,
        runtime="tensorflow",
        input=signature(manifest.input),
        output=signature(manifest.output),
        manifest=manifest,
        runner=runtime,
        output_is_probability=bool(manifest.output_is_probability),
    )
