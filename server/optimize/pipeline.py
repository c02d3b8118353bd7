"""One optimization, start to finish: baseline → candidates (prune, fine-tune, quantize, judge with the served
kernels) → choice within budget → tuning → measurements. Transport-free and storage-free: it returns the Plan
and the report; ``service.Optimizer`` stores and serves them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.server.errors import Cancelled, FailedPrecondition, InvalidArgument
from leanserve.server.serving.model import ServedModel
from leanserve.server.optimize import data as data_mod
from leanserve.server.optimize import evaluate, formats
from leanserve.server.optimize.data import OptimizeData
from leanserve.server.optimize.evaluate import EvalSet
from leanserve.server.optimize.keras_model import plan_specs
from leanserve.server.optimize.options import SEARCH_SPARSITIES, OptimizeOptions
from leanserve.server.optimize.prune import prune
from leanserve.server.runtime.plan import LayerSpec, Plan
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 32)
TF_REFERENCE_ROWS = 512


class JobControl:
    """What the pipeline reports to and asks of its caller: progress, and whether to stop."""

    def __init__(self, progress: Callable[[str, float, str], None], cancelled: Callable[[], bool]) -> None:
        self._progress, self.cancelled = progress, cancelled
        self._fraction = 0.0

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self._fraction = max(self._fraction, min(fraction, 1.0))  # monotonic for the caller's progress bar
        self._progress(stage, self._fraction, message)

    def check(self) -> None:
        """Raise Cancelled when the caller went away (called between stages and after every train batch)."""
        if self.cancelled():
            raise Cancelled("optimization cancelled")


@dataclass
class Candidate:
    sparsity: float
    int8: bool
    plan: Plan
    metric: float
    drop: float
    within_budget: bool

    def summary(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "int8": self.int8, "metric": self.metric, "drop": self.drop,
                "size_bytes": self.plan.nbytes, "within_budget": self.within_budget}


@dataclass
class Result:
    plan: Plan
    report: dict[str, Any]


def eval_and_train_sets(data: OptimizeData | None, opts: OptimizeOptions, input_shape: tuple[int, ...],
                        val_fraction: float) -> tuple[EvalSet, tuple[np.ndarray, np.ndarray] | None]:
    """Rows that judge candidates, and the rows fine-tuning trains on (never the same rows when training)."""
    if data is None:
        return evaluate.random_eval_set(input_shape), None
    if not data.labelled:
        if opts.epochs:
            raise InvalidArgument("fine-tuning (epochs > 0) needs labels: add y to the .npz")
        return EvalSet(data.x, None, "x"), None
    if data.x_val is not None:
        return EvalSet(data.x_val, data.y_val, "x_val"), (data.x, data.y)
    if opts.epochs:
        x_tr, y_tr, x_ev, y_ev = data_mod.split(data.x, data.y, val_fraction)
        return EvalSet(x_ev, y_ev, "split"), (x_tr, y_tr)
    return EvalSet(data.x, data.y, "x"), None


def sparsity_levels(opts: OptimizeOptions) -> list[float]:
    if not opts.search:
        return [opts.target_sparsity]
    return sorted({s for s in SEARCH_SPARSITIES if s < opts.target_sparsity} | {opts.target_sparsity})


def run(base: ServedModel, folder: Path, opts: OptimizeOptions, data: OptimizeData | None, settings: Settings,
        job: JobControl) -> Result:
    """Optimize ``base`` (a Plan-served version) and return the chosen Plan with its report."""
    started = time.monotonic()
    if base.plan is None:
        raise FailedPrecondition(f"model {base.name!r} version {base.version} runs on the {base.runtime} runtime; "
                                 f"only Plan-served models (chains of dense layers) can be optimized")
    base_plan = base.plan
    ev, train = eval_and_train_sets(data, opts, base_plan.input_shape, settings.optimize_val_fraction)
    job.progress("baseline", 0.05, f"judging on {len(ev.x)} rows ({ev.metric}, {ev.source})")
    original = evaluate.run_plan(base_plan, ev.x)
    before = evaluate.quality(original, ev, original)

    levels = sparsity_levels(opts)
    quants = [True, False] if (opts.search and opts.int8) else [opts.int8]
    base_specs = plan_specs(base_plan)
    candidates: list[Candidate] = []
    finetune_info: dict[str, Any] | None = None
    keras_model, keras_origin = None, ""
    if opts.epochs:
        from leanserve.server.optimize.finetune import limit_tf_threads
        from leanserve.server.optimize.keras_model import trainable_model

        job.progress("load", 0.07, "building the Keras model to fine-tune")
        limit_tf_threads(settings.optimize_tf_threads)
        keras_model, keras_origin = trainable_model(base_plan, base.manifest, folder, settings)
    previous = 0.0
    span = 0.7 / len(levels)
    for i, level in enumerate(levels):
        job.check()
        lo = 0.1 + i * span
        if keras_model is not None and level > 0:
            specs, finetune_info = _fine_tune(keras_model, train, base_plan, opts, previous, level, job, lo, span)
        else:
            job.progress("prune", lo, f"one-shot magnitude pruning to {level:.2f}")
            specs = _one_shot(base_specs, level, opts)
        previous = level
        level_ok = False
        for int8 in quants:
            job.check()
            plan = formats.build(base_plan.input_shape, specs, int8, opts.block)
            after = evaluate.quality(evaluate.run_plan(plan, ev.x), ev, original)
            drop = before - after
            cand = Candidate(level, int8, plan, after, drop, drop <= opts.max_accuracy_drop + 1e-12)
            candidates.append(cand)
            level_ok = level_ok or cand.within_budget
            job.progress("evaluate", lo + span, f"sparsity {level:.2f}{' int8' if int8 else ''}: {ev.metric} "
                         f"{after:.4f} (drop {drop:+.4f}){'' if cand.within_budget else ' over budget'}")
        if opts.search and not level_ok:
            break  # higher sparsity from here only loses more: the search stops at the first level over budget

    chosen = _choose(candidates, opts)
    job.check()
    plan = chosen.plan
    if settings.autotune:
        job.progress("tune", 0.82, "measuring kernel formats per layer")
        plan = formats.tune(plan, settings.autotune_batch_sizes, opts.block)
    job.check()
    job.progress("measure", 0.88, "latency, size and reference error")
    outputs = evaluate.run_plan(plan, ev.x)
    after = evaluate.quality(outputs, ev, original)
    lat_before, lat_after = _latencies(base_plan, plan, settings.optimize_latency_repeats, job)
    job.check()
    tf_rows = ev.x[:TF_REFERENCE_ROWS]
    report: dict[str, Any] = {
        "from_version": base.version,
        "options": opts.to_dict(),
        "metric": ev.metric,
        "eval_source": ev.source,
        "eval_rows": int(len(ev.x)),
        "before": {"metric": before, "size_bytes": base_plan.nbytes, "latency_seconds": lat_before,
                   "layers": formats.layer_report(base_plan)},
        "after": {"metric": after, "size_bytes": plan.nbytes, "latency_seconds": lat_after,
                  "layers": formats.layer_report(plan),
                  "agreement_with_original": float(np.mean(outputs.argmax(1) == original.argmax(1))),
                  "max_abs_output_change": float(np.abs(outputs - original).max(initial=0.0))},
        "drop": before - after,
        "max_accuracy_drop": opts.max_accuracy_drop,
        "within_budget": before - after <= opts.max_accuracy_drop + 1e-12,
        "chosen": {"sparsity": chosen.sparsity, "int8": chosen.int8, "block": opts.to_dict()["block"],
                   "granularity": opts.granularity},
        "candidates": [c.summary() for c in candidates],
        "fine_tuning": finetune_info and {**finetune_info, "model": keras_origin},
        "tf_reference": evaluate.tf_reference_error(plan, tf_rows),
        "size_ratio": plan.nbytes / max(base_plan.nbytes, 1),
        "elapsed_seconds": 0.0,
    }
    report["elapsed_seconds"] = time.monotonic() - started
    return Result(plan, report)


def _one_shot(specs: list[LayerSpec], level: float, opts: OptimizeOptions) -> list[LayerSpec]:
    if level == 0.0:
        return specs
    pruned = prune([s.weights for s in specs], level, opts.granularity, opts.block)
    return [LayerSpec(s.name, w, s.bias, s.activation) for s, w in zip(specs, pruned)]


def _fine_tune(model: Any, train: tuple[np.ndarray, np.ndarray] | None, base_plan: Plan, opts: OptimizeOptions,
               initial: float, level: float, job: JobControl, lo: float,
               span: float) -> tuple[list[LayerSpec], dict[str, Any]]:
    from leanserve.server.optimize.finetune import fine_tune
    from leanserve.server.optimize.keras_model import specs_from_keras

    assert train is not None  # eval_and_train_sets returns training rows whenever epochs > 0
    x, y = train

    def on_epoch(epoch: int, sparsity: float, logs: dict[str, float]) -> None:
        job.progress("finetune", lo + span * 0.9 * epoch / opts.epochs,
                     f"target {level:.2f}: epoch {epoch}/{opts.epochs} sparsity {sparsity:.2f} "
                     f"loss {logs.get('loss', float('nan')):.4f}")

    result = fine_tune(model, x, y, output_activation=base_plan.layers[-1].activation, initial=initial,
                       final=level, granularity=opts.granularity, block=opts.block, epochs=opts.epochs, seed=0,
                       cancelled=job.cancelled, on_epoch=on_epoch)
    specs = specs_from_keras(model)
    names = list(base_plan.layer_names)
    specs = [LayerSpec(names[i] if i < len(names) else s.name, s.weights, s.bias, s.activation)
             for i, s in enumerate(specs)]
    return specs, {"epochs_per_level": result.epochs, "steps": result.steps, "final_loss": result.final_loss,
                   "schedule": result.sparsity_schedule, "train_rows": int(len(x))}


def _choose(candidates: list[Candidate], opts: OptimizeOptions) -> Candidate:
    """The smallest served size within budget (ties: the higher sparsity); when none is within budget, the
    requested configuration (stored for inspection, never promoted)."""
    within = [c for c in candidates if c.within_budget]
    if within:
        return min(within, key=lambda c: (c.plan.nbytes, -c.sparsity))
    requested = [c for c in candidates if c.int8 == opts.int8]
    return max(requested or candidates, key=lambda c: c.sparsity)


def _latencies(before: Plan, after: Plan, repeats: int, job: JobControl) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call at each batch size; before and after measured alternately so noise hits both."""
    b: dict[str, list[float]] = {str(n): [] for n in LATENCY_BATCHES}
    a: dict[str, list[float]] = {str(n): [] for n in LATENCY_BATCHES}
    rounds = 3
    for _ in range(rounds):
        job.check()
        for n in LATENCY_BATCHES:
            b[str(n)].append(evaluate.latency(before, n, repeats))
            a[str(n)].append(evaluate.latency(after, n, repeats))
    return ({k: float(np.median(v)) for k, v in b.items()}, {k: float(np.median(v)) for k, v in a.items()})
