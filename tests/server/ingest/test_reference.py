from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from leanserve.server.ingest.keras_to_plan import keras_to_specs
from leanserve.server.ingest.reference import keras_reference, reference_check
from leanserve.server.errors import FailedPrecondition
from leanserve.server.runtime.plan import LayerSpec, build_plan


@pytest.fixture
def model(keras: Any) -> Any:
    L = keras.layers
    return keras.Sequential([keras.Input((8, 8)), L.Flatten(), L.Dense(16, activation="relu"), L.Dense(10),
                             L.Softmax()])


def test_converted_plan_passes(model: Any) -> None:
    shape, specs = keras_to_specs(model)
    report = reference_check(build_plan(shape, specs), keras_reference(model), shape, n=100)
    assert report.within_tolerance
    assert report.n == 100 and report.max_abs_error < 1e-5
    assert json.loads(json.dumps(report.to_dict()))["within_tolerance"] is True


def test_perturbed_weight_is_detected(model: Any) -> None:
    shape, specs = keras_to_specs(model)
    w = specs[0].weights.copy()
    w[3, 5] += 0.05
    perturbed = [LayerSpec(specs[0].name, w, specs[0].bias, specs[0].activation), *specs[1:]]
    report = reference_check(build_plan(shape, perturbed), keras_reference(model), shape)
    assert not report.within_tolerance
    assert report.max_abs_error > report.atol


def test_seeded_inputs_and_shape_mismatch() -> None:
    seen: list[np.ndarray] = []

    def recorder(x: np.ndarray) -> np.ndarray:
        seen.append(x.copy())
        return x

    def identity(x: np.ndarray) -> np.ndarray:
        return x

    assert reference_check(recorder, identity, (3,), n=70, seed=5).within_tolerance
    x = np.concatenate(seen)
    assert x.dtype == np.float32 and x.shape == (70, 3) and len(seen) > 2
    np.testing.assert_array_equal(x, np.random.default_rng(5).standard_normal((70, 3), dtype=np.float32))

    with pytest.raises(FailedPrecondition, match="shape"):
        reference_check(identity, lambda x: x[:, :2], (3,), n=4)
    nan = reference_check(lambda x: x * np.nan, identity, (3,), n=4)
    assert not nan.within_tolerance


def test_a_model_failing_on_the_samples_is_refused_with_its_reason() -> None:
    """A model raising on the sample inputs is a refused upload (FAILED_PRECONDITION with the model's own first line),
    not an internal error; integer inputs get a second try on ids 0 and 1."""
    def refuses_big(x: np.ndarray) -> np.ndarray:
        if x.max() > 1:
            raise ValueError("index 7 is not in [0, 2)\n  [[node gather]]")
        return x.astype(np.float32)

    report = reference_check(refuses_big, refuses_big, (4,), dtype=np.int32, n=50)
    assert report.within_tolerance

    def always(x: np.ndarray) -> np.ndarray:
        raise ValueError("broken layer\ntrace")

    for dtype in (np.int32, np.float32):
        with pytest.raises(FailedPrecondition, match="model refused: it fails on .*sample inputs.*: broken layer$"):
            reference_check(always, always, (4,), dtype=dtype, n=10)
