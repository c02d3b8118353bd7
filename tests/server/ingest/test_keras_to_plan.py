from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from leanserve.server.ingest.keras_to_plan import keras_to_specs, model_signature
from leanserve.server.errors import UnsupportedModel
from leanserve.kernels import activate_numpy
from leanserve.server.runtime.plan import LayerSpec, build_plan


def specs_forward(x: np.ndarray, specs: list[LayerSpec]) -> np.ndarray:
    h = x.reshape(x.shape[0], -1).astype(np.float64)
    for s in specs:
        h = activate_numpy(h @ s.weights.astype(np.float64) + s.bias, s.activation)
    return h


def assert_converts(model: Any, input_shape: tuple[int, ...], n_dense: int) -> None:
    shape, specs = keras_to_specs(model)
    assert shape == input_shape
    assert len(specs) == n_dense
    x = np.random.default_rng(7).standard_normal((33, *input_shape)).astype(np.float32)
    want = np.asarray(model(x, training=False), dtype=np.float64).reshape(33, -1)
    np.testing.assert_allclose(specs_forward(x, specs), want, atol=1e-5, rtol=1e-5)
    plan = build_plan(shape, specs)
    np.testing.assert_allclose(plan(x), want, atol=1e-5, rtol=1e-5)


def test_sequential_with_batchnorm_dropout_and_activation_layers(keras: Any, randomize_batchnorm: Any) -> None:
    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8)),
            L.Flatten(),
            L.Dense(16),
            L.BatchNormalization(),
            L.Activation("relu"),
            L.Dropout(0.5),
            L.Dense(12, activation="tanh"),
            L.BatchNormalization(center=False),  # after an activation: folds into the next Dense
            L.Dense(10),
            L.Softmax(),
        ]
    )
    randomize_batchnorm(model, np.random.default_rng(0))
    assert_converts(model, (8, 8), 3)


def test_functional_chain_with_leading_and_trailing_batchnorm(keras: Any, randomize_batchnorm: Any) -> None:
    L = keras.layers
    inp = keras.Input((6,), name="features")
    h = L.BatchNormalization(scale=False)(inp)  # first layer: folds into the next Dense
    h = L.Dense(9, activation="sigmoid")(h)
    h = L.Dense(5)(h)
    h = L.BatchNormalization()(h)
    h = L.ReLU()(h)
    out = L.Dense(3, activation="linear", use_bias=False, name="logits")(h)
    model = keras.Model(inp, out)
    randomize_batchnorm(model, np.random.default_rng(1))
    assert_converts(model, (6,), 3)
    sig = model_signature(model)
    assert sig["input"] == {"name": "features", "shape": [6], "dtype": "float32"}
    assert sig["output"]["name"] == "logits" and sig["output"]["shape"] == [3]


def test_batchnorm_stats_from_training_fold_exactly(keras: Any) -> None:
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(), keras.layers.Dense(2)]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(2)
    model.fit(rng.normal(3.0, 2.0, (64, 4)).astype(np.float32), rng.normal(size=(64, 2)), epochs=1, verbose=0)
    bn = model.layers[1]
    assert not np.allclose(bn.moving_mean.numpy(), 0.0)
    assert_converts(model, (4,), 2)


@pytest.mark.parametrize(
    "make_layer, why",
    [
        (lambda L: L.LayerNormalization(), "LayerNormalization"),
        (lambda L: L.ReLU(max_value=6.0), "plain ReLU"),
        (lambda L: L.Activation("gelu"), "gelu"),
        (lambda L: L.Activation("tanh"), "already applies"),  # after Dense(relu)
    ],
)
def test_unsupported_layers_are_named(keras: Any, make_layer: Any, why: str) -> None:
    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="relu"), make_layer(L), L.Dense(2)])
    with pytest.raises(UnsupportedModel, match=why):
        keras_to_specs(model)


def test_conv_and_branches_and_late_flatten_are_unsupported(keras: Any) -> None:
    L = keras.layers
    conv = keras.Sequential([keras.Input((8, 2)), L.Conv1D(2, 3), L.Flatten(), L.Dense(2)])
    with pytest.raises(UnsupportedModel, match="Conv1D"):
        keras_to_specs(conv)

    inp = keras.Input((4,))
    a = L.Dense(4, name="a")(inp)
    skip = keras.Model(inp, L.Dense(2, name="b")(L.Add()([a, inp])))
    with pytest.raises(UnsupportedModel):
        keras_to_specs(skip)

    no_flatten = keras.Sequential([keras.Input((3, 4)), L.Dense(2)])
    with pytest.raises(UnsupportedModel, match="Flatten"):
        keras_to_specs(no_flatten)

    trailing_bn = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="relu"), L.BatchNormalization()])
    with pytest.raises(UnsupportedModel, match="no Dense after it"):
        keras_to_specs(trailing_bn)


def test_non_float32_input_is_unsupported(keras: Any) -> None:
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(2, dtype="float64")])
    with pytest.raises(UnsupportedModel, match="float32"):
        keras_to_specs(model)


def test_multi_output_is_refused(keras: Any) -> None:
    inp = keras.Input((4,))
    model = keras.Model(inp, [keras.layers.Dense(2)(inp), keras.layers.Dense(3)(inp)])
    with pytest.raises(UnsupportedModel, match="single-input single-output"):
        model_signature(model)
