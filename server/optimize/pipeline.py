"""One optimization, start to finish: baseline → candidates (prune, fine-tune, quantize, judged with the served
kernels) until one is within budget → tuning → measurements. Transport-free and storage-free: it returns the Plan
and the report; ``service.Optimizer`` stores and serves them.

Three kinds of rows, never mixed: fine-tuning learns from the training rows; the selection rows choose (early
stopping, "is this candidate within budget?"); the held-out rows give the verdict on the candidate the search stops
at. Without ``x_val`` all three are seeded shares of ``x`` (held-out rows set aside before anything else); with it,
``x`` trains and ``x_val`` is halved into selection and held-out rows (rows the original model was trained on
flatter it: a pruned model cannot keep what it memorised, so they would judge it unfairly). The report says "within
budget" only from that verdict, so a search that tried many candidates cannot pass one by luck on the rows it chose
with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.server.errors import Cancelled, FailedPrecondition, InvalidArgument
from leanserve.server.optimize import evaluate, formats, search
from leanserve.server.optimize.data import OptimizeData
from leanserve.server.optimize.evaluate import EvalSet
from leanserve.server.optimize.keras_model import plan_specs
from leanserve.server.optimize.options import OptimizeOptions
from leanserve.server.optimize.prune import prune
from leanserve.server.optimize.search import Recipe
from leanserve.server.runtime.plan import LayerSpec, Plan
from leanserve.server.serving.model import ServedModel
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)

LATENCY_BATCHES = (1, 32)
TF_REFERENCE_ROWS = 512
#: fewest training rows for which the server fine-tunes on its own (an explicit epochs count needs 2)
MIN_AUTO_TRAIN_ROWS = 32
#: a fine-tuning candidate may plan for this share of the time left (the rest is for the candidates after it)
FINE_TUNE_TIME_SHARE = 0.5
#: timed samples of a candidate's batch-1 latency (its report line; the final result is measured thoroughly)
CANDIDATE_LATENCY_REPEATS = 5
SPLIT_SEED = 0
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


@dataclass
class Sets:
    """The rows of one optimization (see the module docstring)."""

    select: EvalSet
    verdict: EvalSet
    train_x: np.ndarray | None = None
    train_y: np.ndarray | None = None  # None with training rows: distillation from the original's outputs
    held_out: bool = True  # the verdict rows are disjoint from the training and selection rows


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held out) index arrays, at least one row on each side (n >= 2)."""
    idx = np.random.default_rng(seed).permutation(n)
    n_out = min(max(1, int(round(fraction * n))), n - 1)
    return idx[n_out:], idx[:n_out]


def _take(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def wants_training(opts: OptimizeOptions, output_activation: str) -> bool:
    """Fine-tune unless told not to (epochs 0), nothing is pruned, or the output is not a trainable classifier
    (an explicit epochs count then fails with FailedPrecondition)."""
    from leanserve.server.optimize.finetune import TRAINABLE_OUTPUTS, check_trainable

    if opts.epochs == 0 or opts.target_sparsity == 0.0:
        return False
    if opts.epochs:
        check_trainable(output_activation)
    return output_activation in TRAINABLE_OUTPUTS


def split_sets(data: OptimizeData | None, opts: OptimizeOptions, input_shape: tuple[int, ...],
               val_fraction: float, output_activation: str) -> Sets:
    """Held-out rows first (x_val, else a seeded share of x), then from the rest the selection rows and, when
    fine-tuning, the training rows."""
    if data is None:
        if opts.epochs:
            raise InvalidArgument("fine-tuning (epochs > 0) needs data: x, with y for labelled data")
        ev = evaluate.random_eval_set(input_shape)
        return Sets(ev, ev, held_out=False)
    x, y = data.x, data.y
    if data.x_val is not None:
        verdict = EvalSet(data.x_val, data.y_val, "x_val")
    elif len(x) >= 2:
        keep, out = _split(len(x), val_fraction, SPLIT_SEED)
        verdict = EvalSet(x[out], _take(y, out), "split")
        x, y = x[keep], _take(y, keep)
    else:
        if opts.epochs:
            raise InvalidArgument("fine-tuning (epochs > 0) needs at least 3 rows of data")
        ev = EvalSet(x, y, "x")
        return Sets(ev, ev, held_out=False)
    train = wants_training(opts, output_activation)
    enough = len(x) >= (3 if opts.epochs else MIN_AUTO_TRAIN_ROWS)
    if opts.epochs and not enough:
        raise InvalidArgument(f"fine-tuning (epochs > 0) needs more rows: {len(x)} left after the held-out rows")
    if not (train and enough):
        return Sets(EvalSet(x, y, "rest"), verdict)
    if verdict.source == "x_val" and len(verdict.x) >= 2:
        # the caller's validation rows choose and judge (half each); x, often what the original was trained on
        # and so flattering it, is all for training
        keep, sel = _split(len(verdict.x), 0.5, SPLIT_SEED + 1)
        return Sets(EvalSet(verdict.x[sel], _take(verdict.y, sel), "x_val"),
                    EvalSet(verdict.x[keep], _take(verdict.y, keep), "x_val"), x, y)
    keep, sel = _split(len(x), val_fraction, SPLIT_SEED + 1)
    return Sets(EvalSet(x[sel], _take(y, sel), "split"), verdict, x[keep], _take(y, keep))


class Trainer:
    """The Keras model fine-tuning trains, built on first use (with the rows and targets it learns from); every
    candidate starts from the original weights, except in the sweep, which continues level after level."""

    def __init__(self, base: ServedModel, folder: Path, opts: OptimizeOptions, sets: Sets, settings: Settings,
                 job: JobControl) -> None:
        self.base, self.folder, self.opts, self.sets, self.settings, self.job = base, folder, opts, sets, settings, job
        self.model: Any = None
        self.origin = ""
        self.initial: list[np.ndarray] = []
        self.data: Any = None
        self.lr = 0.0
        self.epochs = 0

    def _load(self, fraction: float) -> None:
        from leanserve.server.optimize import finetune
        from leanserve.server.optimize.keras_model import dense_layers, trainable_model

        self.job.progress("load", fraction, "building the Keras model to fine-tune")
        finetune.limit_tf_threads(self.settings.optimize_tf_threads)
        plan = self.base.plan
        assert plan is not None and self.sets.train_x is not None
        self.model, self.origin = trainable_model(plan, self.base.manifest, self.folder, self.settings)
        self.initial = [np.array(w) for w in self.model.get_weights()]
        activation = plan.layers[-1].activation
        sel = self.sets.select
        select_y = sel.y if sel.y is not None else evaluate.run_plan(plan, sel.x).argmax(1)
        self.data = finetune.transfer_set(
            self.sets.train_x, self.sets.train_y,
            lambda rows: finetune.probabilities(evaluate.run_plan(plan, rows), activation),
            sel.x, select_y, plan.out_features, seed=SPLIT_SEED)
        self.lr = finetune.learning_rate([np.asarray(d.kernel.numpy()) for d in dense_layers(self.model)])
        self.epochs = self.opts.epochs or finetune.auto_epochs(len(self.data.x))

    def run(self, recipe: Recipe, label: str, lo: float, span: float, deadline: float,
            initial: float = 0.0) -> tuple[list[LayerSpec], dict[str, Any]]:
        """Fine-tune for ``recipe`` (from ``initial`` sparsity: 0 = from the original weights); returns the
        layers and a summary of the training."""
        from leanserve.server.optimize.finetune import fine_tune
        from leanserve.server.optimize.keras_model import specs_from_keras

        if self.model is None:
            self._load(lo)
        longer = recipe.method == search.LONGER
        if initial == 0.0:
            self.model.set_weights(self.initial)
        # longer: again from the original weights, over twice the epochs: the sparsity rises more slowly and the
        # fixed-mask phase lasts longer (measured on digits at 90 %: what one schedule missed, two recovered)
        epochs = min(2 * self.epochs, max(self.settings.optimize_max_epochs, 1)) if longer else self.epochs
        time_allowed = None if self.opts.epochs else max(0.0, deadline - time.monotonic()) * FINE_TUNE_TIME_SHARE

        def on_epoch(epoch: int, planned: int, sparsity: float, logs: dict[str, float]) -> None:
            sel = f" select {logs['select_metric']:.4f}" if "select_metric" in logs else ""
            self.job.progress("finetune", lo + span * 0.9 * min(epoch / planned, 1.0),
                              f"{label} epoch {epoch}/{planned} sparsity {sparsity:.2f} "
                              f"loss {logs.get('loss', float('nan')):.4f}{sel}")

        plan = self.base.plan
        assert plan is not None
        result = fine_tune(self.model, self.data, output_activation=plan.layers[-1].activation, initial=initial,
                           final=recipe.sparsity, granularity=self.opts.granularity, block=recipe.block,
                           epochs=epochs, learning_rate=self.lr, time_allowed=time_allowed, deadline=deadline,
                           seed=SPLIT_SEED, cancelled=self.job.cancelled, on_epoch=on_epoch)
        names = list(plan.layer_names)
        specs = [LayerSpec(names[i] if i < len(names) else s.name, s.weights, s.bias, s.activation)
                 for i, s in enumerate(specs_from_keras(self.model))]
        assert self.sets.train_x is not None
        targets = ("labels + original's probabilities" if self.sets.train_y is not None
                   else "original's probabilities (distillation)")
        info = {**result.to_dict(), "model": self.origin, "train_rows": int(len(self.sets.train_x)),
                "mixup_rows": self.data.mixup_rows, "targets": targets}
        return specs, info


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
    job.progress("measure", 0.88, "latency, size and reference error")
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
        "tf_reference": evaluate.tf_reference_error(plan, sets.verdict.x[:TF_REFERENCE_ROWS]),
        "size_ratio": plan.nbytes / max(base_plan.nbytes, 1),
        "elapsed_seconds": 0.0,
    }
    report["summary"] = summary(report)
    report["elapsed_seconds"] = time.monotonic() - started
    return Result(plan, report)


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
