"""Fixtures for the Keras conversion tests: lazily imported Keras and tiny models with non-trivial weights."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def keras() -> Any:
    from leanserve.server.ingest.keras_loader import import_keras

    return import_keras()


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    if "keras" in request.fixturenames:
        request.getfixturevalue("keras").utils.set_random_seed(1234)


@pytest.fixture
def randomize_batchnorm(keras: Any) -> Any:
    """``f(model, rng)``: give every BatchNormalization non-trivial gamma/beta/moving stats (fresh ones: identity)."""
    return _randomize_batchnorm


def _randomize_batchnorm(model: Any, rng: np.random.Generator) -> None:
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for var in layer.weights:
                n = var.shape[0]
                if "variance" in var.path:
                    var.assign(rng.uniform(0.3, 3.0, n).astype(np.float32))
                else:
                    var.assign(rng.normal(0.0, 1.0, n).astype(np.float32))
