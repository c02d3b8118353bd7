"""Fine-tuning inside an optimization: the Keras model the candidates train, built once on first use."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leanserve.server.optimize import evaluate, search
from leanserve.server.optimize.options import OptimizeOptions
from leanserve.server.optimize.rows import SPLIT_SEED, Sets
from leanserve.server.optimize.search import Recipe
from leanserve.server.runtime.plan import LayerSpec
from leanserve.server.serving.model import ServedModel
from leanserve.server.settings import Settings

if TYPE_CHECKING:
    from leanserve.server.optimize.pipeline import JobControl

#: a fine-tuning candidate may plan for this share of the time left (the rest is for the candidates after it)
FINE_TUNE_TIME_SHARE = 0.5


class Trainer:
    """The Keras model fine-tuning trains, built on first use (with the rows and targets it learns from); every
    candidate starts from the original weights, except in the sweep, which continues level after level."""

    def __init__(self, base: ServedModel, folder: Path, opts: OptimizeOptions, sets: Sets, settings: Settings,
                 job: "JobControl") -> None:
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
