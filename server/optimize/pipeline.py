"""One optimization, start to finish: baseline → candidates (prune, fine-tune, quantize, judged with the served
kernels) until one is within budget → tuning → measurements. Transport-free and storage-free: it returns the Plan
and the report; ``service.Optimizer`` stores and serves them.

The rows it learns from, chooses with and judges by are never mixed (``rows.py``); the report says "within budget"
only from the held-out verdict, so a search that tried many candidates cannot pass one by luck on the rows it chose
with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.server.errors import Cancelled, FailedPrecondition
from leanserve.server.optimize import evaluate, formats, search
from leanserve.server.optimize.data import OptimizeData
from leanserve.server.optimize.keras_model import plan_specs
from leanserve.server.optimize.options import OptimizeOptions
from leanserve.server.optimize.rows import Sets, split_sets
from leanserve.server.optimize.prune import prune
from leanserve.server.optimize.search import Recipe
from leanserve.server.optimize.trainer import Trainer
from leanserve.server.runtime.plan import LayerSpec, Plan
from leanserve.server.serving.model import ServedModel
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 32)
TF_REFERENCE_ROWS = 512
#: timed samples of a candidate's batch-1 latency (its report line; the final result is measured thoroughly)
CANDIDATE_LATENCY_REPEATS = 5
EPS = 1e-12


class JobControl:
    """What the pipeline reports to and asks of its caller: progress, and whether to stop."""

    def __init__(self, progress: Callable[[str, float, str], None], cancelled: Callable[[], bool]) -> None:
        self._progress, self.cancelled = progress, cancelled
        self._fraction = 0.0

    @property
    def fraction(self) -> float:
        """The last fraction reported."""
        return self._fraction

    def progress(self, stage: str, fraction: float, message: str = "") -> None:
        self._fraction = max(self._fraction, min(fraction, 1.0))  # monotonic for the caller's progress bar
        self._progress(stage, self._fraction, message)

    def check(self) -> None:
        """Raise Cancelled when the caller went away (called between stages and after every train batch)."""
        if self.cancelled():
            raise Cancelled("optimization cancelled")


@dataclass
class Candidate:
    """One recipe built and judged: on the selection rows always, on the held-out rows once it passed there."""

    recipe: Recipe
    plan: Plan
    metric: float
    drop: float
    within_budget: bool
    output_error: dict[str, float]
    latency_b1: float
    seconds: float
    fine_tuning: dict[str, Any] | None = None
    held_out_metric: float | None = None
    held_out_drop: float | None = None
    held_out_within: bool | None = None

    @property
    def sparsity(self) -> float:
        return self.recipe.sparsity

    @property
    def int8(self) -> bool:
        return self.recipe.int8

    def summary(self) -> dict[str, Any]:
        return {**self.recipe.to_dict(), "metric": self.metric, "drop": self.drop,
                "within_budget": self.within_budget, "held_out_metric": self.held_out_metric,
                "held_out_drop": self.held_out_drop, "held_out_within_budget": self.held_out_within,
                "size_bytes": self.plan.nbytes, "latency_b1_seconds": self.latency_b1, **self.output_error,
                "seconds": self.seconds, "fine_tuning": self.fine_tuning}


@dataclass
class Result:
    plan: Plan
    report: dict[str, Any]


class Search:
    """Builds and judges candidates; remembers every one tried."""

    def __init__(self, base: ServedModel, folder: Path, opts: OptimizeOptions, sets: Sets, settings: Settings,
                 job: JobControl, deadline: float) -> None:
        assert base.plan is not None
        self.plan, self.opts, self.sets, self.job, self.deadline = base.plan, opts, sets, job, deadline
        self.specs = plan_specs(base.plan)
        self.original_select = evaluate.run_plan(base.plan, sets.select.x)
        self.original_verdict = (self.original_select if sets.verdict is sets.select
                                 else evaluate.run_plan(base.plan, sets.verdict.x))
        self.before_select = evaluate.quality(self.original_select, sets.select, self.original_select)
        self.before = evaluate.quality(self.original_verdict, sets.verdict, self.original_verdict)
        self.trainer = Trainer(base, folder, opts, sets, settings, job) if sets.train_x is not None else None
        self.candidates: list[Candidate] = []
        self.skipped: list[dict[str, str]] = []
        self.stopped = ""
        self.made: tuple[list[LayerSpec], dict[str, Any] | None] | None = None
        self._sizes: dict[tuple[float, Any, bool], int] = {}

    # -- building ---------------------------------------------------------------------------------------------
    def one_shot(self, recipe: Recipe) -> list[LayerSpec]:
        if recipe.sparsity == 0.0:
            return self.specs
        pruned = prune([s.weights for s in self.specs], recipe.sparsity, self.opts.granularity, recipe.block)
        return [LayerSpec(s.name, w, s.bias, s.activation) for s, w in zip(self.specs, pruned)]

    def size_of(self, recipe: Recipe) -> int:
        """Served bytes of the recipe's weights (one-shot; fine-tuning keeps the same count of nonzeros)."""
        key = (recipe.sparsity, recipe.block, recipe.int8)
        if key not in self._sizes:
            self._sizes[key] = formats.build(self.plan.input_shape, self.one_shot(recipe), recipe.int8,
                                             recipe.block).nbytes
        return self._sizes[key]

    def build(self, recipe: Recipe, index: int, total: int, initial: float = 0.0,
              made: tuple[list[LayerSpec], dict[str, Any] | None] | None = None) -> Candidate:
        """Make and judge one candidate on the selection rows. ``made``: weights already made for this recipe's
        sparsity (the sweep quantizes one fine-tuning twice)."""
        t0 = time.monotonic()
        label = f"[{index + 1}/{total} {recipe.label}]"
        lo, span = 0.08 + 0.72 * index / total, 0.72 / total
        info = None
        if made is not None:
            specs, info = made
        elif recipe.method in (search.FINE_TUNE, search.LONGER):
            assert self.trainer is not None
            specs, info = self.trainer.run(recipe, label, lo, span, self.deadline, initial)
        else:
            self.job.progress("prune" if recipe.sparsity else "quantize", lo, f"{label} building")
            specs = self.one_shot(recipe)
        self.made = (specs, info)
        plan = formats.build(self.plan.input_shape, specs, recipe.int8, recipe.block)
        self.job.check()
        out = evaluate.run_plan(plan, self.sets.select.x)
        metric = evaluate.quality(out, self.sets.select, self.original_select)
        drop = self.before_select - metric
        cand = Candidate(recipe, plan, metric, drop, drop <= self.opts.max_accuracy_drop + EPS,
                         evaluate.output_error(out, self.original_select),
                         evaluate.latency(plan, 1, CANDIDATE_LATENCY_REPEATS), time.monotonic() - t0, info)
        self.candidates.append(cand)
        self.job.progress("evaluate", lo + span, f"{label} {self.sets.select.metric} {metric:.4f} "
                          f"(drop {drop:+.4f}){'' if cand.within_budget else ' over budget'}, "
                          f"{plan.nbytes:,} bytes")
        return cand

    def check_held_out(self, cand: Candidate) -> bool:
        """Judge ``cand`` on the held-out rows (once); True when within budget there too."""
        if cand.held_out_metric is None:
            out = evaluate.run_plan(cand.plan, self.sets.verdict.x)
            cand.held_out_metric = evaluate.quality(out, self.sets.verdict, self.original_verdict)
            cand.held_out_drop = self.before - cand.held_out_metric
            cand.held_out_within = cand.held_out_drop <= self.opts.max_accuracy_drop + EPS
            self.job.progress("evaluate", self.job.fraction, f"{cand.recipe.label}: held-out "
                              f"{self.sets.verdict.metric} {cand.held_out_metric:.4f} (drop "
                              f"{cand.held_out_drop:+.4f}){'' if cand.held_out_within else ' over budget'}")
        return bool(cand.held_out_within)

    def out_of_time(self) -> bool:
        """True once the deadline passed (never before the first candidate: there is always a result)."""
        if not self.candidates or time.monotonic() < self.deadline:
            return False
        self.stopped = "time budget reached"
        return True

    # -- the two searches -------------------------------------------------------------------------------------
    def budget(self) -> Candidate | None:
        """The budget ladder: the first candidate within budget on the selection and the held-out rows."""
        ladder = search.budget_ladder(self.opts, self.trainer is not None)
        fallback = self.size_of(ladder[-1]) if ladder[-1].method == search.QUANTIZE else self.plan.nbytes
        for i, recipe in enumerate(ladder):
            self.job.check()
            if self.out_of_time():
                break
            if 0.0 < recipe.sparsity < self.opts.target_sparsity and self.size_of(recipe) >= fallback:
                self.skipped.append({"label": recipe.label, "reason": "not smaller than the last resort"})
                continue
            cand = self.build(recipe, i, len(ladder))
            if cand.within_budget and self.check_held_out(cand):
                self.stopped = "within budget"
                return cand
        self.stopped = self.stopped or "every candidate tried"
        return None

    def sweep(self) -> Candidate | None:
        """Ascending sparsities, stopping at the first level with nothing within budget; the smallest candidate
        within budget on the selection rows that holds on the held-out rows."""
        levels = search.sweep_levels(self.opts, self.trainer is not None)
        total, index, previous = sum(len(level) for level in levels), 0, 0.0
        for level in levels:
            if self.out_of_time():
                break
            ok = False
            for k, recipe in enumerate(level):
                self.job.check()
                # each level continues fine-tuning from the previous one (gradual pruning, level after level);
                # fp32 and int8 of one level share its weights
                cand = self.build(recipe, index, total, initial=previous, made=self.made if k else None)
                index += 1
                ok = ok or cand.within_budget
            previous = level[0].sparsity
            if not ok:
                break
        self.stopped = self.stopped or "sweep done"
        for cand in sorted((c for c in self.candidates if c.within_budget), key=lambda c: (c.plan.nbytes,
                                                                                        -c.sparsity)):
            if self.check_held_out(cand):
                return cand
        return None

    def best(self) -> Candidate:
        """When nothing fits: the candidate closest to the budget (then the smallest), judged held-out too."""
        cand = min(self.candidates, key=lambda c: (c.drop, c.plan.nbytes))
        self.check_held_out(cand)
        return cand


def run(base: ServedModel, folder: Path, opts: OptimizeOptions, data: OptimizeData | None, settings: Settings,
        job: JobControl) -> Result:
    """Optimize ``base`` (a Plan-served version) and return the chosen Plan with its report."""
    started = time.monotonic()
    if base.plan is None:
        raise FailedPrecondition(f"model {base.name!r} version {base.version} runs on the {base.runtime} runtime; "
                                 f"only Plan-served models (chains of dense layers) can be optimized")
    base_plan = base.plan
    time_budget = opts.time_budget_seconds or settings.optimize_time_budget_seconds
    sets = split_sets(data, opts, base_plan.input_shape, settings.optimize_val_fraction,
                      base_plan.layers[-1].activation)
    job.progress("baseline", 0.04, f"held out {len(sets.verdict.x)} rows ({sets.verdict.source}), choosing on "
                 f"{len(sets.select.x)}, training on {0 if sets.train_x is None else len(sets.train_x)} "
                 f"({sets.verdict.metric})")
    s = Search(base, folder, opts, sets, settings, job, started + time_budget)
    found = s.sweep() if opts.search else s.budget()
    chosen = found or s.best()
    job.check()
    plan = chosen.plan
    if settings.autotune:
        job.progress("tune", 0.82, "measuring kernel formats per layer")
        plan = formats.tune(plan, settings.autotune_batch_sizes, chosen.recipe.block)
    job.check()
    job.progress("measure", 0.88, "reference check, latency, size")
    reference = check_reference(plan, sets.verdict.x[:TF_REFERENCE_ROWS], settings)
    outputs = evaluate.run_plan(plan, sets.verdict.x)
    after = evaluate.quality(outputs, sets.verdict, s.original_verdict)
    lat_before, lat_after = _latencies(base_plan, plan, settings.optimize_latency_repeats, job)
    job.check()
    within = found is not None and s.before - after <= opts.max_accuracy_drop + EPS
    report: dict[str, Any] = {
        "from_version": base.version,
        "options": opts.to_dict(),
        "metric": sets.verdict.metric,
        "eval_source": sets.verdict.source,
        "eval_rows": int(len(sets.verdict.x)),
        "held_out": sets.held_out,
        "selection": {"source": sets.select.source, "rows": int(len(sets.select.x)), "before": s.before_select},
        "before": {"metric": s.before, "size_bytes": base_plan.nbytes, "latency_seconds": lat_before,
                   "layers": formats.layer_report(base_plan)},
        "after": {"metric": after, "size_bytes": plan.nbytes, "latency_seconds": lat_after,
                  "layers": formats.layer_report(plan),
                  "agreement_with_original": float(np.mean(outputs.argmax(1) == s.original_verdict.argmax(1))),
                  "max_abs_output_change": float(np.abs(outputs - s.original_verdict).max(initial=0.0))},
        "drop": s.before - after,
        "max_accuracy_drop": opts.max_accuracy_drop,
        "within_budget": within,
        "chosen": {**chosen.recipe.to_dict(), "granularity": opts.granularity},
        "search": {"mode": "sweep" if opts.search else "budget", "time_budget_seconds": time_budget,
                   "stopped": s.stopped, "skipped": s.skipped},
        "candidates": [c.summary() for c in s.candidates],
        "fine_tuning": chosen.fine_tuning,
        "reference_check": reference,
        "tf_reference": evaluate.tf_reference_error(plan, sets.verdict.x[:TF_REFERENCE_ROWS]),
        "size_ratio": plan.nbytes / max(base_plan.nbytes, 1),
        "elapsed_seconds": 0.0,
    }
    report["summary"] = summary(report)
    report["elapsed_seconds"] = time.monotonic() - started
    return Result(plan, report)


def check_reference(plan: Plan, x: np.ndarray, settings: Settings) -> dict[str, Any]:
    """The stored reference check: the served kernels against ``evaluate.simulate`` (the same weights and, for int8,
    the same activation quantization, in numpy float64) with the upload check's tolerances. Outside them the
    kernels do not compute what the plan says, whatever the accuracy: FailedPrecondition, nothing is stored (an
    upload outside tolerance is refused the same way). The intended int8 error is not judged here but by the
    accuracy budget, and reported against TensorFlow as ``tf_reference``."""
    report = evaluate.simulation_check(plan, x, settings.reference_atol, settings.reference_rtol)
    if not report["within_tolerance"]:
        log.error("optimized plan refused: served outputs differ from the simulation of its arithmetic: %s", report)
        raise FailedPrecondition(
            f"optimized model refused: served outputs differ from the {report['reference']} beyond tolerance "
            f"(max abs error {report['max_abs_error']:.3g}, max rel error {report['max_rel_error']:.3g} on "
            f"{report['n']} rows; allowed atol={report['atol']} rtol={report['rtol']}); a kernel computes something "
            f"other than its weights say, so no version was stored"
        )
    return report


def summary(r: dict[str, Any]) -> str:
    """One sentence: what was kept and whether the budget holds on held-out rows, or the best found."""
    c = r["chosen"]
    rows = f"{r['eval_rows']} {'held-out' if r['held_out'] else 'random' if r['eval_source'] == 'random' else ''}"
    measured = (f"{r['metric']} {r['after']['metric']:.4f} vs {r['before']['metric']:.4f} on {rows.strip()} rows, "
                f"{r['after']['size_bytes'] / max(r['before']['size_bytes'], 1):.1%} of the size")
    if r["within_budget"]:
        return f"within budget: {c['label']} ({measured})"
    return (f"OVER budget: no candidate stayed within {r['max_accuracy_drop'] * 100:.2f} points "
            f"({r['search']['stopped']}); best found: {c['label']} ({measured})")


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
