"""Gradual magnitude pruning with TensorFlow fine-tuning, as a Keras 3 callback.

Why a callback and not tensorflow-model-optimization: tfmot's ``prune_low_magnitude`` wraps layers with the
legacy ``tf_keras`` API and does not support Keras 3 (tfmot#1119, #1141); using it would mean a second Keras
(``TF_USE_LEGACY_KERAS=1``) in the server process, which would also change how every uploaded model loads. The
callback does what tfmot's wrapper does, on plain Keras 3 Dense layers: every ``frequency`` steps it recomputes
the masks from the current weights at the sparsity of a polynomial schedule, and after *every* train batch it
multiplies the kernels by their masks, so the optimizer's update never brings a pruned weight back into the next
forward pass. The schedule reaches the target at ``END_FRACTION`` of training; the remaining steps fine-tune
with the final masks fixed. The same callback checks for cancellation after every batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from leanserve.server.errors import Cancelled, FailedPrecondition
from leanserve.server.optimize import prune
from leanserve.server.optimize.keras_model import dense_layers

log = logging.getLogger(__name__)

BATCH_SIZE = 32
LEARNING_RATE = 5e-3  # measured on digits: 90% sparsity recovers in 15 epochs (5e-4 did not)
#: fraction of the training steps over which sparsity rises to the target
END_FRACTION = 0.7
#: masks are recomputed this many times per epoch while the sparsity rises
UPDATES_PER_EPOCH = 4

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


@dataclass
class FineTuneResult:
    epochs: int
    steps: int
    final_loss: float
    sparsity_schedule: str



def make_callback(model: Any, *, initial: float, final: float, granularity: str, block: tuple[int, int] | None,
                  total_steps: int, steps_per_epoch: int, cancelled: Callable[[], bool],
                  on_epoch: Callable[[int, float, dict[str, float]], None]) -> Any:
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    layers = dense_layers(model)
    end = max(1, int(END_FRACTION * total_steps))
    frequency = max(1, steps_per_epoch // UPDATES_PER_EPOCH)

    class _Pruning(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.sparsity = initial
            self.masks = self._recompute(initial)

        def _recompute(self, sparsity: float) -> list[np.ndarray]:
            weights = [np.asarray(layer.kernel.numpy()) for layer in layers]
            return prune.masks(weights, sparsity, granularity, block)

        def _apply(self) -> None:
            for layer, mask in zip(layers, self.masks):
                layer.kernel.assign(layer.kernel.numpy() * mask)

        def on_train_begin(self, logs: dict | None = None) -> None:
            self._apply()

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.step += 1
            if self.step <= end and self.step % frequency == 0:
                self.sparsity = prune.polynomial_sparsity(self.step, 0, end, initial, final)
                self.masks = self._recompute(self.sparsity)
            elif self.step == end + 1:
                self.sparsity = final
                self.masks = self._recompute(final)
            self._apply()
            if cancelled():
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            on_epoch(epoch + 1, self.sparsity, {k: float(v) for k, v in (logs or {}).items()})

        def on_train_end(self, logs: dict | None = None) -> None:
            # the end state is exactly the target, whatever step training stopped at
            self.sparsity = final
            self.masks = self._recompute(final)
            self._apply()

    return _Pruning()


def fine_tune(model: Any, x: np.ndarray, y: np.ndarray, *, output_activation: str, initial: float, final: float,
              granularity: str, block: tuple[int, int] | None, epochs: int, seed: int,
              cancelled: Callable[[], bool],
              on_epoch: Callable[[int, float, dict[str, float]], None]) -> FineTuneResult:
    """Train ``model`` in place on ``(x, y)`` while its Dense kernels are pruned from ``initial`` to ``final``
    sparsity; returns a summary. Raises Cancelled when ``cancelled()`` became true during training."""
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    if output_activation == "softmax":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    elif output_activation == "linear":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        raise FailedPrecondition(f"fine-tuning trains classifiers with a softmax or linear output; this model's "
                                 f"output activation is {output_activation!r} (use epochs=0)")
    keras.utils.set_random_seed(seed)
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    callback = make_callback(model, initial=initial, final=final, granularity=granularity, block=block,
                             total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                             cancelled=cancelled, on_epoch=on_epoch)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE), loss=loss, jit_compile=False)
    history = model.fit(x, y, epochs=epochs, batch_size=BATCH_SIZE, shuffle=True, verbose=0, callbacks=[callback])
    if cancelled():
        raise Cancelled("optimization cancelled during fine-tuning")
    losses = history.history.get("loss") or [float("nan")]
    return FineTuneResult(epochs=len(losses), steps=callback.step, final_loss=float(losses[-1]),
                          sparsity_schedule=f"polynomial power 3 from {initial:.2f} to {final:.2f} over the first "
                                            f"{int(END_FRACTION * 100)}% of steps, masks applied after every batch")
