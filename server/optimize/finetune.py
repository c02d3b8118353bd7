"""Gradual magnitude pruning with TensorFlow fine-tuning, as a Keras 3 callback.

Why a callback and not tensorflow-model-optimization: tfmot's ``prune_low_magnitude`` wraps layers with the legacy
``tf_keras`` API and does not support Keras 3 (tfmot#1119, #1141); using it would mean a second Keras
(``TF_USE_LEGACY_KERAS=1``) in the server process, which would also change how every uploaded model loads. The
callback does what tfmot's wrapper does, on plain Keras 3 Dense layers: every ``frequency`` steps it recomputes the
masks from the current weights at the sparsity of a polynomial schedule, and after *every* train batch it multiplies
the kernels by their masks, so the optimizer's update never brings a pruned weight back into the next forward pass.
The schedule reaches the target at ``END_FRACTION`` of the planned steps; the remaining epochs fine-tune with the
final masks fixed and the learning rate decaying linearly to a tenth, watched by early stopping on the selection
rows (the best epoch's weights are kept). The same callback checks for cancellation and for the search's deadline
after every batch.

What the model learns from (``transfer_set``): knowledge distillation from the original model. Labelled rows get
targets half one-hot label, half the original's probabilities; on top, as many mixup rows (random convex
combinations of two training rows) labelled by the original alone. Measured on digits at 90 % sparsity + int8
(70 % of the data sent, judged on the other 30 %): plain labels lost 1.1-1.7 points, distillation with mixup rows
0.0-0.6 — small data sets are where pruned models lose the original's function, and the original can label as
many extra rows as wanted. Without labels the original's probabilities are the only targets (distillation).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leanserve.server.errors import Cancelled, FailedPrecondition
from leanserve.server.optimize import prune
from leanserve.server.optimize.keras_model import dense_layers

log = logging.getLogger(__name__)

BATCH_SIZE = 32
#: fraction of the planned steps over which sparsity rises to the target
END_FRACTION = 0.7
#: masks are recomputed this many times per epoch while the sparsity rises
UPDATES_PER_EPOCH = 4
#: training steps the server aims for when it chooses the epochs (digits at 90 %: 1,500 steps left it 1-2
#: points short on some splits, 3,000 recovered it)
TARGET_STEPS = 3000
MIN_AUTO_EPOCHS, MAX_AUTO_EPOCHS = 4, 60
#: epochs without a better selection metric, after the schedule reached its target, before training stops
PATIENCE = 3
#: share of a labelled row's target that is the one-hot label (the rest: the original model's probabilities)
LABEL_WEIGHT = 0.5
#: mixup rows per training row (the steps do not grow with them: TARGET_STEPS sets the training time); on digits
#: at 90 % with a split where the pruned model missed the budget by half a point, 3 passed where 1 did not
MIXUP_FACTOR = 3
#: Adam's step as a fraction of the smallest layer's RMS weight: 5e-3 suits digits' 64-wide layers (RMS ~0.1)
#: and would wreck a 4096-wide layer (RMS ~0.015), so the rate follows the weights' scale
LR_PER_RMS = 0.04
MIN_LR, MAX_LR = 1e-5, 1e-2
#: classifier outputs fine-tuning can train, and whether the model's output is logits
TRAINABLE_OUTPUTS = {"softmax": False, "linear": True}

_threads_configured = threading.Lock()
_threads_done = False


def limit_tf_threads(threads: int) -> bool:
    """Ask TensorFlow for ``threads`` intra-op and inter-op threads so fine-tuning leaves cores to predict.

    Only possible before TensorFlow's runtime starts (e.g. a Keras upload starts it): then it is left as is and
    False is returned."""
    global _threads_done
    with _threads_configured:
        if _threads_done:
            return True
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
            _threads_done = True
        except RuntimeError:
            log.info("TensorFlow already initialised: fine-tuning uses its existing thread pools")
        return _threads_done


def auto_epochs(rows: int) -> int:
    """Epochs the server plans for ``rows`` training rows: about ``TARGET_STEPS`` steps, within bounds (the
    time budget may cut them after the first epoch is timed)."""
    steps_per_epoch = max(1, -(-rows // BATCH_SIZE))
    return int(min(MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch))))


def learning_rate(weights: list[np.ndarray]) -> float:
    """Adam's learning rate scaled to the weights (see LR_PER_RMS)."""
    rms = min(float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) for w in weights if w.size)
    return float(min(MAX_LR, max(MIN_LR, LR_PER_RMS * rms)))


def probabilities(outputs: np.ndarray, output_activation: str) -> np.ndarray:
    """The model's outputs as class probabilities (softmax of logits for a linear output)."""
    if output_activation == "softmax":
        return outputs.astype(np.float32)
    z = outputs.astype(np.float64) - outputs.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def check_trainable(output_activation: str) -> None:
    """FailedPrecondition unless fine-tuning can train this output."""
    if output_activation not in TRAINABLE_OUTPUTS:
        raise FailedPrecondition(f"fine-tuning trains classifiers with a softmax or linear output; this model's "
                                 f"output activation is {output_activation!r} (use epochs=0)")


@dataclass
class TrainSet:
    """Rows and soft targets fine-tuning learns from, and the selection rows early stopping watches."""

    x: np.ndarray
    targets: np.ndarray  # [n, classes] probabilities
    select_x: np.ndarray
    select_y: np.ndarray  # class ids: labels, or the original model's top-1 without labels
    labelled_rows: int
    mixup_rows: int


def transfer_set(x: np.ndarray, y: np.ndarray | None, teacher: Callable[[np.ndarray], np.ndarray],
                 select_x: np.ndarray, select_y: np.ndarray, num_classes: int, seed: int) -> TrainSet:
    """Distillation targets for ``x`` (mixed with one-hot ``y`` when labelled) plus ``len(x)`` mixup rows the
    original (``teacher``: rows → probabilities) labels."""
    soft = teacher(x)
    if y is not None:
        soft = LABEL_WEIGHT * np.eye(num_classes, dtype=np.float32)[y] + (1.0 - LABEL_WEIGHT) * soft
    rng = np.random.default_rng(seed)
    n, m = len(x), MIXUP_FACTOR * len(x)
    i, j = rng.integers(0, n, m), rng.integers(0, n, m)
    lam = rng.uniform(0.0, 1.0, (m,) + (1,) * (x.ndim - 1)).astype(np.float32)
    mixed = lam * x[i] + (1.0 - lam) * x[j]
    return TrainSet(np.concatenate([x, mixed]), np.concatenate([soft, teacher(mixed)]).astype(np.float32),
                    select_x, select_y, labelled_rows=n if y is not None else 0, mixup_rows=m)


@dataclass
class FineTuneResult:
    epochs_planned: int
    epochs_run: int
    steps: int
    final_loss: float
    learning_rate: float
    stopped: str  # "planned epochs" | "early stopping" | "time share" | "deadline"
    best_epoch: int | None
    best_select_metric: float | None
    sparsity_schedule: str
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_planned": self.epochs_planned, "epochs_run": self.epochs_run, "steps": self.steps,
                "final_loss": self.final_loss, "learning_rate": self.learning_rate, "stopped": self.stopped,
                "best_epoch": self.best_epoch, "best_select_metric": self.best_select_metric,
                "schedule": self.sparsity_schedule}


def _select_metric(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    preds = [np.asarray(model(x[i:i + 512], training=False)).argmax(axis=1) for i in range(0, len(x), 512)]
    return float(np.mean(np.concatenate(preds) == y))


def make_callback(model: Any, *, initial: float, final: float, granularity: str, block: tuple[int, int] | None,
                  epochs: int, steps_per_epoch: int, data: TrainSet, time_allowed: float | None, deadline: float,
                  cancelled: Callable[[], bool],
                  on_epoch: Callable[[int, int, float, dict[str, float]], None]) -> Any:
    """The pruning + early-stopping callback (see the module docstring). ``time_allowed``: seconds this run may
    take, the planned epochs are cut to fit once the first epoch is timed (None: keep them); ``deadline``
    (``time.monotonic()``): stop at the next batch after it."""
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    layers = dense_layers(model)

    class _Pruning(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.planned = epochs
            self.end = self._end_step()
            self.frequency = max(1, steps_per_epoch // UPDATES_PER_EPOCH)
            self.sparsity = initial
            self.masks = self._recompute(initial)
            self.started = self.epoch_started = time.monotonic()
            self.lr = 0.0
            self.stopped = "planned epochs"
            self.best: tuple[float, int, list[np.ndarray]] | None = None
            self.wait = 0
            self.epochs_run = 0
            self.history: list[dict[str, float]] = []

        def _end_step(self) -> int:
            return 0 if initial == final else max(1, int(END_FRACTION * self.planned * steps_per_epoch))

        def _recompute(self, sparsity: float) -> list[Any]:
            weights = [np.asarray(layer.kernel.numpy()) for layer in layers]
            return [keras.ops.convert_to_tensor(m) for m in prune.masks(weights, sparsity, granularity, block)]

        def _apply(self) -> None:
            for layer, mask in zip(layers, self.masks):
                layer.kernel.assign(layer.kernel * mask)

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.lr = float(np.asarray(self.model.optimizer.learning_rate))
            self.started = self.epoch_started = time.monotonic()
            self._apply()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch_started = time.monotonic()
            if self.step >= self.end:
                # with the masks fixed, the rate decays linearly to a tenth over the epochs left
                end_epoch = self.end / steps_per_epoch
                left = max(self.planned - end_epoch, 1.0)
                factor = max(0.1, 1.0 - (epoch - end_epoch) / left)
                self.model.optimizer.learning_rate.assign(self.lr * factor)

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.step += 1
            if self.step <= self.end and self.step % self.frequency == 0:
                self.sparsity = prune.polynomial_sparsity(self.step, 0, self.end, initial, final)
                self.masks = self._recompute(self.sparsity)
            elif self.step > self.end and self.sparsity != final:
                self.sparsity = final
                self.masks = self._recompute(final)
            self._apply()
            if cancelled():
                self.model.stop_training = True
            elif time.monotonic() > deadline:
                self.stopped = "deadline"
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.epochs_run = epoch + 1
            logs = {k: float(v) for k, v in (logs or {}).items()}
            if time_allowed is not None:
                self._fit_in_time(time.monotonic())
            if self.step >= self.end and self.sparsity == final:
                metric = _select_metric(self.model, data.select_x, data.select_y)
                logs["select_metric"] = metric
                improved = self.best is None or metric > self.best[0] + 1e-12
                if improved or metric >= self.best[0] - 1e-12:  # on a tie the later (longer trained) weights
                    self.best = (metric, epoch + 1, [np.array(w) for w in self.model.get_weights()])
                self.wait = 0 if improved else self.wait + 1
                if not improved:
                    if self.wait >= PATIENCE:
                        self.stopped = "early stopping"
                        self.model.stop_training = True
            self.history.append({"epoch": epoch + 1, "sparsity": self.sparsity, **logs})
            on_epoch(epoch + 1, self.planned, self.sparsity, logs)
            if self.epochs_run >= self.planned and not self.model.stop_training:
                if self.planned < epochs:
                    self.stopped = "time share"
                self.model.stop_training = True

        def _fit_in_time(self, now: float) -> None:
            # cut the planned epochs to what the last epoch's pace leaves time for (never more than planned);
            # the schedule shrinks with them, so the target is still reached before the end
            per_epoch = max(now - self.epoch_started, 1e-6)
            fit = self.epochs_run + max(0, int((time_allowed - (now - self.started)) // per_epoch))
            if fit >= self.planned:
                return
            schedule_done = self.step >= self.end
            self.planned = max(fit, self.epochs_run + (0 if schedule_done else 1))
            self.end = min(self.end, self._end_step())
            log.info("fine-tuning: %d epochs fit in %.0f s", self.planned, time_allowed)

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.best is not None:
                self.model.set_weights(self.best[2])  # already masked at the final sparsity
            # the end state is exactly the target, whatever step training stopped at
            self.sparsity = final
            self.masks = self._recompute(final)
            self._apply()

    return _Pruning()


def fine_tune(model: Any, data: TrainSet, *, output_activation: str, initial: float, final: float,
              granularity: str, block: tuple[int, int] | None, epochs: int, learning_rate: float,
              time_allowed: float | None, deadline: float, seed: int, cancelled: Callable[[], bool],
              on_epoch: Callable[[int, int, float, dict[str, float]], None]) -> FineTuneResult:
    """Train ``model`` in place on ``data`` while its Dense kernels are pruned from ``initial`` to ``final``
    sparsity (``initial == final``: masks fixed from the current weights); at most ``epochs`` epochs, fewer when
    ``time_allowed`` cuts them, the selection metric stops improving, or ``deadline`` passes. Returns a summary.
    Raises Cancelled when ``cancelled()`` became true during training."""
    from leanserve.server.ingest.keras_loader import import_keras

    check_trainable(output_activation)
    keras = import_keras()
    loss = keras.losses.CategoricalCrossentropy(from_logits=TRAINABLE_OUTPUTS[output_activation])
    keras.utils.set_random_seed(seed)
    steps_per_epoch = -(-len(data.x) // BATCH_SIZE)
    callback = make_callback(model, initial=initial, final=final, granularity=granularity, block=block,
                             epochs=epochs, steps_per_epoch=steps_per_epoch, data=data, time_allowed=time_allowed,
                             deadline=deadline, cancelled=cancelled, on_epoch=on_epoch)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), loss=loss, jit_compile=False)
    history = model.fit(data.x, data.targets, epochs=epochs, batch_size=BATCH_SIZE, shuffle=True, verbose=0,
                        callbacks=[callback])
    if cancelled():
        raise Cancelled("optimization cancelled during fine-tuning")
    losses = history.history.get("loss") or [float("nan")]
    schedule = (f"masks fixed at {final:.2f}" if initial == final else
                f"polynomial power 3 from {initial:.2f} to {final:.2f} over the first {int(END_FRACTION * 100)}% "
                f"of {callback.planned} planned epochs")
    best = callback.best
    return FineTuneResult(epochs_planned=callback.planned, epochs_run=callback.epochs_run, steps=callback.step,
                          final_loss=float(losses[-1]), learning_rate=learning_rate, stopped=callback.stopped,
                          best_epoch=best[1] if best else None, best_select_metric=best[0] if best else None,
                          sparsity_schedule=schedule + ", masks applied after every batch", history=callback.history)
