"""The transport-free core: upload, list, describe, delete and predict in plain Python (no protobuf).

Both APIs (leanserve.v1 and the Open Inference Protocol) call into this one object, so they behave alike.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.server.ingest import build as ingest
from leanserve.server.serving.batching import BatchConfig, Batcher, Ready
from leanserve.server.errors import (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, LeanserveError,
                                     NotFound, ResourceExhausted, shown)
from leanserve.server.repository.audit import AUDIT_FILE, AuditLog
from leanserve.server.repository.loading import load_version, served_from_plan
from leanserve.server.serving.model import PredictResult, ServedModel
from leanserve.server.serving.context import NO_CONTEXT, RequestContext
from leanserve.server.ingest.uploads import UploadRequest
from leanserve.server.serving.postprocess import PostProcess, apply, check_request
from leanserve.server.serving.registry import ModelRegistry
from leanserve.server.repository.store import Repository, folder_bytes, validate_name
from leanserve.server.settings import Settings
from leanserve.server.ingest.uploads import check_header, receive
from leanserve.server.serving.validation import select_input, validate_batch
from leanserve.server.serving.workers import blocking

log = logging.getLogger(__name__)
_RAW = PostProcess.RAW  # a module constant: looking a member up on its enum costs more, on every request

#: the first wait before a version that failed to load is tried again; it doubles on each failure, up to the max
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0


class DataPlane:
    """Everything the servicers can ask of the server."""

    def __init__(self, settings: Settings, repository: Repository, registry: ModelRegistry) -> None:
        self.settings = settings
        self.repository = repository
        self.registry = registry
        # Conversion holds a whole model (and maybe TensorFlow) in memory: one at a time bounds the peak.
        self._ingest_lock = threading.Lock()
        # Serializes changes to what is served: loads, unloads, publishing, deletes and the repository poll.
        self._load_lock = threading.RLock()
        #: versions that failed to load -> (monotonic time of the next try, current backoff): the repository poll
        #: retries them (a store that answered 503, a folder copied in by hand and seen half-written) without
        #: reading a corrupt version again on every poll
        self._failed: dict[tuple[str, int], tuple[float, float]] = {}
        #: False until the repository is loaded and again once shutting down
        self.ready = False
        #: who changed which model, when, with what result (see repository/audit.py)
        self.audit = AuditLog(repository.root / AUDIT_FILE)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def load_all(self) -> list[tuple[str, int, str]]:
        """Load every stored version (except unloaded models) and apply pinned defaults; a version that fails to
        load is logged and skipped, not fatal."""
        failures = self.sync()
        self.ready = True
        return failures

    def sync(self) -> list[tuple[str, int, str]]:
        """Make what is served match the repository: serve stored versions that are not served (unless the model
        is marked unloaded), retire served versions that are gone, apply the pinned defaults. This is how server
        processes sharing a repository follow each other. A version that failed to load is tried again after a
        backoff (``load_model`` retries at once); a model whose entry cannot be read is reported and skipped, the
        others followed. Returns the new failures."""
        with self._load_lock:
            stored = self.repository.models()  # versions first, pins after: see Optimizer._store
            failures = []
            for name in sorted(set(stored) | set(self.registry.names())):
                try:
                    failures += self._reconcile(name, stored.get(name, []))
                except (LeanserveError, OSError, ValueError) as exc:
                    log.error("could not follow model %s in the repository: %s", name, exc)
                    failures.append((name, 0, str(exc)))
            return failures

    def _reconcile(self, name: str, stored: list[int]) -> list[tuple[str, int, str]]:
        """Serve exactly ``stored`` of ``name`` (nothing when unloaded); caller holds the load lock."""
        wanted = [] if stored and self.repository.is_unloaded(name) else stored
        served = self.registry.versions(name)
        gone = [v for v in served if v not in wanted]
        if gone:
            self._retire(self.registry.remove(name, gone))
            log.info("stopped serving %s version(s) %s: no longer in the repository or unloaded", name, gone)
        now = time.monotonic()
        new = [v for v in wanted if v not in served and self._failed.get((name, v), (0.0, 0.0))[0] <= now]
        failures = self._load_versions(name, new) if new else []
        self.registry.set_default(name, self.repository.default_version(name) if wanted else None)
        return failures

    def _load_versions(self, name: str, versions: list[int]) -> list[tuple[str, int, str]]:
        failures = []
        for version in versions:
            try:
                path = self.repository.path(name, version)
                manifest = self.repository.manifest(name, version)
                self.serve(load_version(name, version, path, manifest, self.settings))
                self._failed.pop((name, version), None)
                log.info("loaded %s version %d", name, version)
            except (LeanserveError, OSError, ValueError, KeyError, MemoryError) as exc:
                backoff = min(2 * self._failed.get((name, version), (0.0, RETRY_FIRST_SECONDS / 2))[1],
                              RETRY_MAX_SECONDS)
                self._failed[(name, version)] = (time.monotonic() + backoff, backoff)
                log.error("could not load %s version %d (next try in %.0f s): %s", name, version, backoff, exc)
                failures.append((name, version, str(exc)))
        return failures

    def serve(self, model: ServedModel) -> None:
        """Publish a loaded version behind its own batcher (replacing a served one with the same number)."""
        model.max_rows = min(model.max_rows, self.settings.max_batch_size)  # per request too: read once here
        config = BatchConfig.for_model(self.settings, model.name, model.manifest.to_dict())
        if config.max_batch_size > model.max_rows:  # a kernel call stays within the model's working memory
            config = dataclasses.replace(config, max_batch_size=model.max_rows)
        model.batcher = Batcher(model.infer, config, model.stats, f"{model.name}:{model.version}")
        replaced = self.registry.add(model)
        if replaced is not None:
            self._retire([replaced])

    @staticmethod
    def _retire(models: list[ServedModel]) -> None:
        # Requests already queued finish; requests still holding the model run inline (see Batcher.stop).
        for model in models:
            if model.batcher is not None:
                model.batcher.stop()

    def close(self) -> None:
        """Not ready any more; drain and stop every batcher (call after the transport stopped taking calls)."""
        self.ready = False
        self._retire(self.registry.all())
        self.audit.close()

    def load_model(self, name: str, ctx: RequestContext = NO_CONTEXT) -> list[int]:
        """Serve the stored versions of ``name`` that are not served (e.g. after ``unload_model``); retries versions
        that failed to load before. Returns the versions it loaded."""
        with self.audit.change(ctx, "load", name) as entry:
            validate_name(name)  # before touching the disk: the answer must not depend on what exists outside
            with self._load_lock:
                stored = self.repository.versions(name)  # NotFound for an unknown model
                self._clear_unloaded(name)
                for v in stored:
                    self._failed.pop((name, v), None)
                before = set(self.registry.versions(name))
                failures = self._reconcile(name, stored)
            if failures:
                raise FailedPrecondition(
                    f"model {name!r}: {len(failures)} version(s) failed to load: {failures[0][2]}")
            entry.version = [v for v in stored if v not in before]
        return entry.version

    def _clear_unloaded(self, name: str) -> None:
        if self.repository.is_unloaded(name):
            self.repository.set_unloaded(name, False)

    def unload_model(self, name: str, ctx: RequestContext = NO_CONTEXT) -> list[int]:
        """Stop serving every version of ``name``; the repository keeps them, marked unloaded (so other processes
        and a restart follow) until ``load_model`` serves them again."""
        with self.audit.change(ctx, "unload", name) as entry:
            validate_name(name)
            with self._load_lock:
                entry.version = versions = self.registry.versions(name)
                stored = self.repository.versions(name, missing_ok=True)
                if not versions and not stored:
                    raise NotFound(f"model {shown(name)} not found")
                if stored:
                    self.repository.set_unloaded(name, True)
                self._retire(self.registry.remove(name, versions))
        return versions

    def repository_index(self) -> list[tuple[str, int, bool]]:
        """Every stored or served version: (name, version, served)."""
        stored = {(n, v) for n, vs in self.repository.models().items() for v in vs}
        served = {(m.name, m.version) for m in self.registry.all()}
        return [(n, v, (n, v) in served) for n, v in sorted(stored | served)]

    # -- models ----------------------------------------------------------------------------------------------
    def upload(self, req: UploadRequest, chunks: Iterable[bytes], ctx: RequestContext = NO_CONTEXT) -> ServedModel:
        """Receive, convert, check, store and serve a new version. Returns it once it is durable and served."""
        with self.audit.change(ctx, "upload", req.name) as entry:
            validate_name(req.name)
            check_header(req, self.settings.max_upload_bytes)
            self.check_limits(req.name, req.size_bytes)  # early, on the declared size; publish checks what was written
            with self.repository.staging() as staged:
                source = receive(req, chunks, staged / "upload.bin", self.settings.max_upload_bytes)
                with self._ingest_lock:
                    manifest, conv = ingest.build(req, source, staged, self.settings)
                    served = self.publish(req.name, staged, lambda version: self._built(req.name, version, manifest,
                                                                                         conv.plan))
            entry.version = served.version
        log.info("serving %s version %d (%s runtime)", req.name, served.version, served.runtime)
        return served

    def publish(self, name: str, staged: Path, build: Callable[[int], ServedModel]) -> ServedModel:
        """Commit ``staged`` as the next version of ``name`` and serve ``build(version)``. Publishing to an unloaded
        model loads it again. Holds the load lock throughout, so the repository poll never loads the new version
        a second time."""
        with self._load_lock:
            self.check_limits(name, folder_bytes(staged))
            self._clear_unloaded(name)
            version = self.repository.commit(name, staged)
            served = build(version)
            self.serve(served)
            self._reconcile(name, self.repository.versions(name))
        return served

    def check_limits(self, name: str, new_bytes: int = 0) -> None:
        """ResourceExhausted when one more version of ``name`` (taking ``new_bytes``) would pass max_models,
        max_versions_per_model or max_repository_bytes."""
        s = self.settings
        stored = self.repository.models()
        if name not in stored and len(stored) >= s.max_models:
            raise ResourceExhausted(f"the repository holds {len(stored)} models, the limit (max_models); delete one "
                                    "or add a version to an existing model")
        if len(stored.get(name, [])) >= s.max_versions_per_model:
            raise ResourceExhausted(f"model {name!r} has {len(stored[name])} versions, the limit "
                                    "(max_versions_per_model); delete old versions first")
        used = self.repository.size_bytes()
        if used + new_bytes > s.max_repository_bytes:
            raise ResourceExhausted(f"the repository holds {used} bytes; {new_bytes} more would pass the limit of "
                                    f"{s.max_repository_bytes} (max_repository_bytes)")

    def _built(self, name: str, version: int, manifest: dict[str, Any], plan: Any) -> ServedModel:
        if plan is not None:
            return served_from_plan(name, version, manifest, plan, self.settings)
        return load_version(name, version, self.repository.path(name, version), manifest, self.settings)

    def list_models(self) -> dict[str, list[int]]:
        """Every served model and its versions."""
        return {name: self.registry.versions(name) for name in self.registry.names()}

    def get_model(self, name: str, version: int | None = None) -> ServedModel:
        """One served version (latest when ``version`` is falsy)."""
        return self.registry.get(name, version)

    def set_default(self, name: str, version: int | None) -> int:
        """Pin ``version`` as what version 0 of ``name`` resolves to, or unpin with None (the latest is the default).
        The pin is persisted in the repository (other processes follow it) before it is served. Returns the default
        version afterwards; NotFound for an unknown model or version."""
        validate_name(name)
        with self._load_lock:
            self.registry.get(name, version or None)  # NotFound for an unknown model or version
            self.repository.set_default_version(name, version or None)
            self.registry.set_default(name, version or None)
            return self.registry.get(name, None).version

    def delete_model(self, name: str, version: int | None = None, ctx: RequestContext = NO_CONTEXT) -> list[int]:
        """Stop serving and delete one version or all; NotFound when unknown."""
        with self.audit.change(ctx, "delete", name, version or None) as entry, self._load_lock:
            entry.version = deleted = self.repository.delete(name, version or None)
            if not self.repository.versions(name, missing_ok=True):
                self._clear_unloaded(name)  # a model deleted whole leaves no mark for its next upload
            self._retire(self.registry.remove(name, deleted))
        return deleted

    # -- inference -------------------------------------------------------------------------------------------
    def predict(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, np.ndarray],
        postprocess: PostProcess = PostProcess.RAW,
        top_k: int = 0,
        ctx: RequestContext = NO_CONTEXT,
    ) -> PredictResult:
        """Validate, run (batched with other callers' requests) and post-process one request."""
        return self.submit(name, version, inputs, postprocess, top_k, ctx).result()

    def submit(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, np.ndarray],
        postprocess: PostProcess = PostProcess.RAW,
        top_k: int = 0,
        ctx: RequestContext = NO_CONTEXT,
        outputs: tuple[str, ...] = (),
    ) -> "PendingPredict":
        """Validate and queue one request without waiting for it (streams keep several in flight). ``outputs``: the
        names the caller asked for (none = all); each must be one this request produces."""
        if top_k and postprocess is not PostProcess.TOP_K:
            raise InvalidArgument(f"top_k applies to the top_k post-processing only, not to {postprocess.value}")
        model = self.registry.get(name, version)
        started = time.perf_counter_ns()
        try:
            if outputs or postprocess is not _RAW:
                check_request(postprocess, top_k, model.output, outputs)
            x = validate_batch(model, select_input(model, inputs), model.max_rows)
            batcher = model.batcher or Batcher(model.infer, BatchConfig(enabled=False), model.stats)
            future = batcher.submit(x, ctx)
        except Exception:
            model.stats.record_request(False, time.perf_counter_ns() - started)
            raise
        return PendingPredict(model, future, postprocess, top_k, ctx, started, x.shape[0])

    def describe(self, model: ServedModel) -> dict[str, Any]:
        """Manifest plus live facts (versions, per-layer formats) for GetModel."""
        info = model.manifest.to_dict()
        info["version"] = model.version
        info["versions"] = self.registry.versions(model.name)
        info["default_version"] = self.registry.default_version(model.name)
        info["max_batch_size"] = min(self.settings.max_batch_size, model.max_rows)
        if model.plan is not None:
            info["layers_served"] = model.plan.describe()
            info["served_size_bytes"] = model.plan.nbytes
        return info


class PendingPredict:
    """A queued request; ``result()`` waits for its rows, post-processes them and counts the outcome."""

    __slots__ = ("model", "_future", "_postprocess", "_top_k", "_ctx", "_started", "_rows")

    def __init__(self, model: ServedModel, future: "Future[np.ndarray] | Ready", postprocess: PostProcess, top_k: int,
                 ctx: RequestContext, started_ns: int, rows: int = 0) -> None:
        self.model, self._future, self._postprocess, self._top_k = model, future, postprocess, top_k
        self._ctx, self._started, self._rows = ctx, started_ns, rows

    @property
    def output_bytes(self) -> int:
        """The bytes of the model's output for this request's rows (what post-processing starts from)."""
        return self._rows * self.model.output.row_bytes

    def cancel(self) -> None:
        """The caller went away: skip the request if it is still queued."""
        self._future.cancel()

    @property
    def done(self) -> bool:
        """True when the rows are already computed (the request ran at once): nothing left to cancel."""
        return self._future.done()

    def result(self) -> PredictResult:
        """The outputs, or the request's error (DeadlineExceeded when the deadline passes first)."""
        model = self.model
        try:
            future = self._future
            try:
                if future.done():  # ran at once, or already answered
                    y = future.result()
                else:
                    deadline = self._ctx.deadline
                    with blocking():  # the thread waits for the batch: another may take a call meanwhile
                        y = future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                self._future.cancel()  # still queued: the batcher skips it
                raise DeadlineExceeded("the deadline passed before the request was answered") from None
            except CancelledError:
                raise Cancelled("the request was cancelled") from None
            outputs = apply(self._postprocess, model.output.name, y, is_probability=model.output_is_probability,
                            top_k=self._top_k)
        except Exception:
            model.stats.record_request(False, time.perf_counter_ns() - self._started)
            raise
        model.stats.record_request(True, time.perf_counter_ns() - self._started)
        return PredictResult(model.name, model.version, outputs)
