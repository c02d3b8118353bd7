"""Train the seed MLP (Input -> Dense(128, relu) -> Dense(64, relu) -> Dense(10, softmax)) on an offline dataset.

A print-free core: progress goes to an optional callback, the CLI does the printing. TensorFlow is imported
lazily, on the first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from leanserve.server.tools.datasets import NUM_CLASSES, load_dataset
from leanserve.server.errors import InvalidArgument

#: Called after every epoch with ``(epoch, logs)``: epoch counts from 1; logs hold loss/accuracy/val_*.
ProgressCallback = Callable[[int, dict[str, float]], None]

SAVE_SUFFIXES = (".keras", ".h5")


@dataclass
class TrainResult:
    """What ``train_mlp`` produced: the saved file, final accuracies and the per-epoch history."""

    path: Path
    dataset: str
    epochs: int
    seed: int
    train_accuracy: float
    val_accuracy: float
    history: dict[str, list[float]]
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "dataset": self.dataset,
            "epochs": self.epochs,
            "seed": self.seed,
            "train_accuracy": self.train_accuracy,
            "val_accuracy": self.val_accuracy,
            "history": self.history,
        }


def build_mlp(in_features: int) -> Any:
    """The seed model architecture, uncompiled."""
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    return keras.Sequential(
        [
            keras.Input((in_features,), name="input"),
            keras.layers.Dense(128, activation="relu", name="dense_1"),
            keras.layers.Dense(64, activation="relu", name="dense_2"),
            keras.layers.Dense(NUM_CLASSES, activation="softmax", name="output"),
        ],
        name="mlp",
    )


def train_mlp(
    dataset: str,
    epochs: int,
    *,
    out: Path,
    batch_size: int = 32,
    seed: int = 0,
    learning_rate: float = 1e-3,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train the seed MLP with Adam on one-hot categorical cross-entropy and save it to ``out``.

    The format follows ``out``'s suffix (``.keras`` or legacy ``.h5``). Seeds Python, numpy and TF with
    ``seed`` (global state) so runs repeat.
    """
    out = Path(out)
    if out.suffix not in SAVE_SUFFIXES:
        raise InvalidArgument(f"output must end in {' or '.join(SAVE_SUFFIXES)}, got {out.name!r}")
    if epochs < 1 or batch_size < 1:
        raise InvalidArgument("epochs and batch_size must be at least 1")
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_val, y_val = load_dataset(dataset, seed)

    model = build_mlp(x_train.shape[1])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks = []
    if progress is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: progress(epoch + 1, {k: float(v) for k, v in (logs or {}).items()})
            )
        )
    fit = model.fit(
        x_train,
        keras.utils.to_categorical(y_train, NUM_CLASSES),
        validation_data=(x_val, keras.utils.to_categorical(y_val, NUM_CLASSES)),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return TrainResult(
        path=out,
        dataset=dataset,
        epochs=epochs,
        seed=seed,
        train_accuracy=_accuracy(model, x_train, y_train),
        val_accuracy=_accuracy(model, x_val, y_val),
        history={k: [float(v) for v in vs] for k, vs in fit.history.items()},
        model=model,
    )


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    probs = np.asarray(model(x, training=False))
    return float(np.mean(np.argmax(probs, axis=1) == y))
