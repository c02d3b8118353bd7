from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from leanserve.server.tools.datasets import load_dataset  # noqa: E402
from leanserve.server.errors import InvalidArgument  # noqa: E402
from leanserve.server.tools.training import train_mlp  # noqa: E402


def test_datasets_shapes_and_split() -> None:
    x_train, y_train, x_val, y_val = load_dataset("digits", seed=0)
    assert x_train.shape[1] == 64 and x_train.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert len(x_train) + len(x_val) == 1797
    # stratified: every class in the validation split in roughly the same proportion
    assert np.bincount(y_val, minlength=10).min() >= 30
    xs, ys, xv, yv = load_dataset("synthetic", seed=0)
    assert xs.shape[1] == 1000 and set(np.unique(ys)) == set(range(10))
    with pytest.raises(InvalidArgument):
        load_dataset("mnist", seed=0)


def test_train_mlp_on_digits(tmp_path: Path) -> None:
    epochs_seen: list[int] = []
    result = train_mlp("digits", 3, out=tmp_path / "mlp.h5", seed=0, progress=lambda e, logs: epochs_seen.append(e))
    assert result.val_accuracy > 0.85
    assert epochs_seen == [1, 2, 3]
    assert len(result.history["val_accuracy"]) == 3
    assert result.path.is_file()
    shapes = [tuple(w.shape) for w in result.model.weights]
    assert shapes == [(64, 128), (128,), (128, 64), (64,), (64, 10), (10,)]

    from leanserve.server.ingest.keras_loader import load_keras
    from leanserve.server.ingest.keras_to_plan import keras_to_specs

    _, specs = keras_to_specs(load_keras(result.path, max_bytes=1 << 22))
    assert [s.activation for s in specs] == ["relu", "relu", "softmax"]


def test_train_mlp_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="keras"):
        train_mlp("digits", 1, out=tmp_path / "model.pkl")
