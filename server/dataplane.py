"""The transport-free core: upload, list, describe, delete and predict in plain Python (no protobuf).

Both APIs (leanserve.v1 and the Open Inference Protocol) call into this one object, so they behave alike.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from server import ingest
from server.errors import LeanserveError
from server.loading import load_version, served_from_plan
from server.models import PredictResult, ServedModel, UploadRequest
from server.postprocess import PostProcess, apply
from server.registry import ModelRegistry
from server.repository import Repository, validate_name
from server.settings import Settings
from server.uploads import check_header, receive
from server.validation import select_input, validate_batch

log = logging.getLogger(__name__)


class DataPlane:
    """Everything the servicers can ask of the server."""

    def __init__(self, settings: Settings, repository: Repository, registry: ModelRegistry) -> None:
        self.settings = settings
        self.repository = repository
        self.registry = registry
        # Conversion holds a whole model (and maybe TensorFlow) in memory: one at a time bounds the peak.
        self._ingest_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------
    def load_all(self) -> list[tuple[str, int, str]]:
        """Load every stored version; a version that fails to load is logged and skipped, not fatal."""
        failures = []
        for name, versions in self.repository.models().items():
            for version in versions:
                path = self.repository.path(name, version)
                try:
                    manifest = self.repository.manifest(name, version)
                    self.registry.add(load_version(name, version, path, manifest, self.settings))
                    log.info("loaded %s version %d", name, version)
                except (LeanserveError, OSError, ValueError, KeyError) as exc:
                    log.error("could not load %s version %d: %s", name, version, exc)
                    failures.append((name, version, str(exc)))
        return failures

    # -- models ----------------------------------------------------------------------------------------------
    def upload(self, req: UploadRequest, chunks: Iterable[bytes]) -> ServedModel:
        """Receive, convert, check, store and serve a new version. Returns it once it is durable and served."""
        validate_name(req.name)
        check_header(req, self.settings.max_upload_bytes)
        with self.repository.staging() as staged:
            source = receive(req, chunks, staged / "upload.bin", self.settings.max_upload_bytes)
            with self._ingest_lock:
                manifest, conv = ingest.build(req, source, staged, self.settings)
                version = self.repository.commit(req.name, staged)
        if conv.plan is not None:
            served = served_from_plan(req.name, version, manifest, conv.plan, self.settings)
        else:
            path = self.repository.path(req.name, version)
            served = load_version(req.name, version, path, manifest, self.settings)
        self.registry.add(served)
        log.info("serving %s version %d (%s runtime)", req.name, version, served.runtime)
        return served

    def list_models(self) -> dict[str, list[int]]:
        """Every served model and its versions."""
        return {name: self.registry.versions(name) for name in self.registry.names()}

    def get_model(self, name: str, version: int | None = None) -> ServedModel:
        """One served version (latest when ``version`` is falsy)."""
        return self.registry.get(name, version)

    def delete_model(self, name: str, version: int | None = None) -> list[int]:
        """Stop serving and delete one version or all; NotFound when unknown."""
        if version:
            self.registry.get(name, version)  # NotFound with a good message
        deleted = self.repository.delete(name, version or None)
        self.registry.remove(name, deleted)
        return deleted

    # -- inference -------------------------------------------------------------------------------------------
    def predict(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, np.ndarray],
        postprocess: PostProcess = PostProcess.RAW,
        top_k: int = 0,
    ) -> PredictResult:
        """Validate, run and post-process one request."""
        model = self.registry.get(name, version)
        x = validate_batch(model, select_input(model, inputs), self.settings.max_batch_size)
        y = model.infer(x)
        outputs = apply(postprocess, model.output.name, y, is_probability=model.output_is_probability, top_k=top_k)
        return PredictResult(model_name=model.name, model_version=model.version, outputs=outputs)

    def describe(self, model: ServedModel) -> dict[str, Any]:
        """Manifest plus live facts (versions, per-layer formats) for GetModel."""
        info = dict(model.manifest)
        info["version"] = model.version
        info["versions"] = self.registry.versions(model.name)
        info["max_batch_size"] = self.settings.max_batch_size
        if model.plan is not None:
            info["layers_served"] = model.plan.describe()
            info["served_size_bytes"] = model.plan.nbytes
        return info
