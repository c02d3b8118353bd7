"""Offline datasets for training and accuracy checks (nothing is downloaded).

``digits``: scikit-learn's bundled 8x8 digits (1,797 x 64, pixel values scaled to [0, 1]), stratified 80/20 split.
``synthetic``: 1,000 features, 10 classes, like the seed model's input; a learnable ``make_classification`` task.
Labels are integer class ids (int64); features float32.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from leanserve.server.errors import InvalidArgument

DatasetName = Literal["digits", "synthetic"]
DATASETS: tuple[str, ...] = ("digits", "synthetic")
NUM_CLASSES = 10

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def load_dataset(name: str, seed: int = 0, *, val_fraction: float = 0.2, synthetic_samples: int = 3000) -> Split:
    """Return ``(x_train, y_train, x_val, y_val)`` for ``name`` ("digits" or "synthetic"), split by ``seed``."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        x = (data.data / 16.0).astype(np.float32)  # pixel intensities are 0..16
        y = data.target.astype(np.int64)
    elif name == "synthetic":
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=synthetic_samples,
            n_features=1000,
            n_informative=40,
            n_redundant=20,
            n_classes=NUM_CLASSES,
            n_clusters_per_class=1,
            class_sep=2.0,
            random_state=seed,
        )
        x, y = x.astype(np.float32), y.astype(np.int64)
    else:
        raise InvalidArgument(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=val_fraction, stratify=y, random_state=seed
    )
    return x_train, y_train, x_val, y_val
