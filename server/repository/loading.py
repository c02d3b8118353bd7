"""Loading a stored version from the repository into a ready ``ServedModel`` (warmed: no request pays a JIT)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from leanserve.server.repository import artifacts
from leanserve.server.serving.model import ServedModel, TensorSignature
from leanserve.server.runtime.plan import Plan
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)


def served_from_plan(name: str, version: int, manifest: dict[str, Any], plan: Plan, settings: Settings) -> ServedModel:
    """Wrap an in-memory Plan (already built and checked) as a served version."""
    plan.warmup(settings.warmup_batch_sizes)
    return ServedModel(
        name=name,
        version=version,
        runtime="plan",
        input=TensorSignature.from_dict(manifest["input"]),
        output=TensorSignature.from_dict(manifest["output"]),
        manifest=manifest,
        runner=plan,
        output_is_probability=bool(manifest.get("output_is_probability")),
        plan=plan,
    )


def load_version(name: str, version: int, path: Path, manifest: dict[str, Any], settings: Settings) -> ServedModel:
    """Build the runtime a stored version names (a Plan from its safetensors, or TensorFlow from its source)."""
    if manifest.get("runtime") == "plan":
        plan = artifacts.plan_from_files(manifest, (path / artifacts.WEIGHTS).read_bytes())
        return served_from_plan(name, version, manifest, plan, settings)
    from leanserve.server.runtime.tf_runtime import TFRuntime

    runtime = TFRuntime.from_path(path / manifest["source"]["file"], max_bytes=settings.max_upload_bytes)
    runtime.warmup()
    return ServedModel(
        name=name,
        version=version,
        runtime="tensorflow",
        input=TensorSignature.from_dict(manifest["input"]),
        output=TensorSignature.from_dict(manifest["output"]),
        manifest=manifest,
        runner=runtime,
        output_is_probability=bool(manifest.get("output_is_probability")),
    )
