"""The digits MLP (64→128→64→10, trained with TF) and its data, shared by the optimization tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from leanserve.server.ingest.keras_to_plan import keras_to_specs
from leanserve.server.tools.datasets import load_dataset
from leanserve.server.repository.loading import served_from_plan
from leanserve.server.serving.model import ServedModel
from leanserve.server.runtime.plan import build_plan
from leanserve.server.settings import Settings
from leanserve.server.tools.training import train_mlp


@dataclass
class Digits:
    path: Path
    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_accuracy: float

    def data(self) -> dict[str, np.ndarray]:
        return {"x": self.x, "y": self.y, "x_val": self.x_val, "y_val": self.y_val}


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    out = tmp_path_factory.mktemp("digits") / "digits.keras"
    result = train_mlp("digits", 15, out=out, seed=0)
    x, y, x_val, y_val = load_dataset("digits", 0)
    return Digits(out, x, y, x_val, y_val, result.val_accuracy)


@pytest.fixture(scope="session")
def digits_served(digits: Digits) -> ServedModel:
    """The digits model as an fp32 Plan-served version (what the server would hold after the upload)."""
    from leanserve.server.ingest.keras_loader import load_keras

    model = load_keras(digits.path, max_bytes=1 << 30)
    input_shape, specs = keras_to_specs(model)
    manifest = {"input": {"name": "input", "dtype": "float32", "shape": [64]},
                "output": {"name": "output", "dtype": "float32", "shape": [10]},
                "source": {"format": "keras", "file": digits.path.name}, "output_is_probability": True}
    return served_from_plan("digits", 1, manifest, build_plan(input_shape, specs), Settings(warmup_batch_sizes=(1,)))
