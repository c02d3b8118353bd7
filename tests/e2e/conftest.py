"""Keras model files for the end-to-end tests (built once per session; weights random but seeded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from leanserve.server.app import ServerHandle, create_server
from tests.conftest import make_settings
from tests.toy import GatedRunner, toy_model


@pytest.fixture(scope="session")
def keras() -> Any:
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(7)
    return keras


@pytest.fixture(scope="session")
def model_files(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``seed_h5``/``seed_keras``: the seed MLP 1000→128→64→10; ``bn_keras``: functional with BN and Dropout;
    ``layernorm_keras``: a model the Plan cannot express; ``lambda_keras``/``lambda_h5``: unsafe Lambda models."""
    d = tmp_path_factory.mktemp("models")
    seed = keras.Sequential(
        [
            keras.Input((1000,), name="input"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    seed.save(d / "seed.h5")
    seed.save(d / "seed.keras")

    inp = keras.Input((8, 8), name="pixels")
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(32)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.Dropout(0.3)(h)
    out = keras.layers.Dense(5, activation="softmax")(h)
    bn = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    bn_layer = next(layer for layer in bn.layers if isinstance(layer, keras.layers.BatchNormalization))
    gamma, beta, mean, var = bn_layer.get_weights()
    bn_layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 1, beta.shape),
                          rng.normal(0, 1, mean.shape), rng.uniform(0.5, 3, var.shape)])
    bn.save(d / "bn.keras")

    ln = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16), keras.layers.LayerNormalization(),
                           keras.layers.Dense(3)])
    ln.save(d / "layernorm.keras")

    lam = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Dense(2)])
    lam.save(d / "lambda.keras")
    return {"seed_h5": d / "seed.h5", "seed_keras": d / "seed.keras", "bn_keras": d / "bn.keras",
            "layernorm_keras": d / "layernorm.keras", "lambda_keras": d / "lambda.keras"}


@pytest.fixture(scope="session")
def keras_predict(keras: Any):
    """``f(path, x)``: the Keras reference output for a saved model."""
    cache: dict[Path, Any] = {}

    def run(path: Path, x: np.ndarray) -> np.ndarray:
        if path not in cache:
            cache[path] = keras.models.load_model(path, compile=False)
        return np.asarray(cache[path](x, training=False))

    return run


@pytest.fixture
def gated_server(repo_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[ServerHandle, GatedRunner]]:
    """A server (settings from the test's ``settings`` marker) serving the toy ``y = 2x`` model behind a gate."""
    markers = list(request.node.iter_markers("settings"))
    assert len(markers) <= 1, "one settings marker per test: a second one would be silently ignored"
    marker = markers[0] if markers else None
    handle = create_server(make_settings(repo_dir, **(marker.kwargs if marker else {})))
    runner = GatedRunner()
    handle.dataplane.serve(toy_model(runner))
    yield handle, runner
    runner.gate.set()
    handle.stop(0.5)


@pytest.fixture
def toy_server(gated_server: tuple[ServerHandle, GatedRunner]) -> ServerHandle:
    """``gated_server``'s server alone (its gate open)."""
    return gated_server[0]
