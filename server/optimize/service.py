"""The optimization service: one bounded background job at a time, cancellable, stored as a new version.

A job runs in its own daemon thread (at most ``settings.optimize_max_jobs`` at once; more are refused with
RESOURCE_EXHAUSTED, never queued behind a long fine-tuning), so gRPC worker threads and predictions keep flowing;
a daemon thread also never holds up server shutdown. The caller gets a ``Job`` and iterates its events. The new
version is assembled in the repository's staging folder and committed in one rename only at the very end, so a
crash or a cancellation mid-way leaves no half version.

Default version: a model's default (what version 0 resolves to) is its latest version unless pinned. A result
that is not promoted (``promote`` false, or over budget) pins the default to the version that was the default
before, so the new version is stored and served by number only. A promoted result unpins (the latest, i.e. the
new version, is the default). ``set_default`` is the rollback; pins live in the repository (survive restarts).

Reference check: the result's served outputs must match an exact numpy simulation of its arithmetic (the same
weights and, for int8, the same per-row activation quantization) within the upload tolerances
(``pipeline.check_reference``). A result outside them is refused with FAILED_PRECONDITION and nothing is stored,
as an upload outside tolerance is; being over the accuracy budget, by contrast, stores the version unpromoted.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from leanserve.server.repository import artifacts
from leanserve.server.dataplane import DataPlane
from leanserve.server.errors import FailedPrecondition, LeanserveError, ResourceExhausted
from leanserve.server.repository.loading import served_from_plan
from leanserve.server.optimize import data as data_mod
from leanserve.server.optimize import pipeline
from leanserve.server.optimize.options import OptimizeOptions, validate
from leanserve.server.repository.store import validate_name
from leanserve.server.serving.context import NO_CONTEXT, RequestContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    stage: str
    fraction: float
    message: str


@dataclass(frozen=True)
class Report:
    """The final event: the new version, the default after the call, and the full report dict."""

    model_name: str
    version: int
    from_version: int
    default_version: int
    promoted: bool
    report: dict[str, Any]


class Job:
    """A running optimization; iterate ``events()`` for Progress then one Report (or the job's error)."""

    _DONE = object()

    def __init__(self) -> None:
        self._events: queue.Queue[Any] = queue.Queue()
        self._cancel = threading.Event()
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop at the next check (between stages, after every training batch)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, event: Any) -> None:
        self._events.put(event)

    def events(self, poll_seconds: float = 0.5) -> Iterator[Progress | Report]:
        """Yield events until the job ends; re-raise its error. Stops early (cancelling) once cancelled."""
        while True:
            try:
                event = self._events.get(timeout=poll_seconds)
            except queue.Empty:
                if self._cancel.is_set():
                    return
                continue
            if event is Job._DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event


class Optimizer:
    """Starts optimization jobs over the dataplane's repository and registry."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane
        self.settings = dataplane.settings
        self._slots = threading.BoundedSemaphore(self.settings.optimize_max_jobs)

    def set_default(self, name: str, version: int, ctx: RequestContext = NO_CONTEXT) -> tuple[int, bool]:
        """Pin ``version`` as ``name``'s default, or unpin with 0. Returns (default version, pinned)."""
        with self.dp.audit.change(ctx, "set_default", name, version or None):
            return self.dp.set_default(name, version or None), bool(version)

    def start(self, opts: OptimizeOptions, chunks: Iterable[bytes], ctx: RequestContext = NO_CONTEXT) -> Job:
        """Check the options, take a slot (ResourceExhausted when busy), receive the data, start the work."""
        validate(opts, max_epochs=self.settings.optimize_max_epochs,
                 max_data_bytes=self.settings.optimize_max_data_bytes,
                 max_time_budget_seconds=self.settings.optimize_max_time_budget_seconds)
        validate_name(opts.model_name)
        base = self.dp.registry.get(opts.model_name, opts.version or None)
        self.dp.check_limits(opts.model_name)  # refuse before minutes of work; publish checks again with the bytes
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted("another optimization is running; try again when it has finished")
        try:
            blob = data_mod.receive(chunks, opts.data_size_bytes, self.settings.optimize_max_data_bytes)
            data = None
            if blob:
                data = data_mod.parse(blob, base.plan.input_shape if base.plan else base.input.shape,
                                      base.output.shape[-1] if base.output.shape else 1,
                                      self.settings.optimize_max_data_bytes, self.settings.max_unpack_ratio)
            job = Job()
            worker = threading.Thread(target=self._work, args=(job, base, opts, data, ctx), daemon=True,
                                      name=f"leanserve-optimize-{opts.model_name}")
            worker.start()
        except BaseException:
            self._slots.release()
            raise
        return job

    def _work(self, job: Job, base: Any, opts: OptimizeOptions, data: Any, ctx: RequestContext) -> None:
        control = pipeline.JobControl(lambda s, f, m: job._put(Progress(s, f, m)), lambda: job.cancelled)
        try:
            folder = self.dp.repository.path(base.name, base.version)
            result = pipeline.run(base, folder, opts, data, self.settings, control)
            control.check()
            control.progress("store", 0.97, "writing the new version")
            report = self._store(base, opts, result)
            self.dp.audit.record(ctx, "optimize", base.name, report.version, "ok")
            job._put(report)
        except LeanserveError as exc:
            log.info("optimization of %s stopped: %s", opts.model_name, exc.message)
            self.dp.audit.record(ctx, "optimize", base.name, None, exc.code.value)
            job._put(exc)
        except Exception as exc:  # a bug: logged with its traceback; the transport answers INTERNAL
            log.exception("optimization of %s failed", opts.model_name)
            self.dp.audit.record(ctx, "optimize", base.name, None, "internal")
            job._put(exc)
        finally:
            job._put(Job._DONE)
            job.finished.set()
            self._slots.release()

    def _store(self, base: Any, opts: OptimizeOptions, result: pipeline.Result) -> Report:
        """Commit the plan as the next version (staging → rename), serve it, then set the default."""
        promote = bool(opts.promote and result.report["within_budget"])
        report = {**result.report, "promoted": promote}
        ref = report["reference_check"]
        if not ref["within_tolerance"]:  # pipeline.check_reference already refuses it; never store one
            raise FailedPrecondition(f"optimized model refused: outside the reference tolerance ({ref})")
        previous_default = self.dp.registry.get(base.name, None).version
        plan_manifest, blob = artifacts.plan_manifest(result.plan, base.input.name, base.output.name)
        manifest = plan_manifest.with_fields(**{
            "name": base.name,
            "runtime": "plan",
            "input": base.input.to_dict(),
            "output": base.output.to_dict(),
            "output_is_probability": bool(base.output_is_probability),
            "source": {"format": "optimized", "from_version": base.version},
            "reference": {key: ref[key] for key in ("reference", "n", "max_abs_error", "max_rel_error",
                                                    "within_tolerance", "atol", "rtol")},
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "description": opts.description or f"optimized from version {base.version}",
            "conversion_note": "",
            "metadata": {"optimization": report},
        })
        with self.dp.repository.staging() as staged:
            (staged / artifacts.WEIGHTS).write_bytes(blob)
            (staged / artifacts.MANIFEST).write_text(manifest.to_json())
            if not promote:
                # pinned before the new version exists, so no request ever sees it as the default
                self.dp.set_default(base.name, previous_default)
            served = self.dp.publish(
                base.name, staged, lambda v: served_from_plan(base.name, v, manifest, result.plan, self.settings)
            )
        version = served.version
        if promote:
            self.dp.set_default(base.name, None)
        default = self.dp.registry.get(base.name, None).version
        report = {**report, "version": version, "default_version": default}
        log.info("optimized %s v%d -> v%d (within budget: %s, default v%d)", base.name, base.version, version,
                 report["within_budget"], default)
        return Report(base.name, version, base.version, default, promote, report)
