"""The Keras model fine-tuning trains: the uploaded source file when there is one, else a Sequential rebuilt
from the Plan's fp32 weights. TensorFlow is imported lazily (only optimization with fine-tuning pays for it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from leanserve.server.repository.manifest import Manifest
from leanserve.server.runtime.plan import LayerSpec, Plan
from leanserve.server.settings import Settings

log = logging.getLogger(__name__)


def plan_specs(plan: Plan) -> list[LayerSpec]:
    """The plan's layers as fp32 ``LayerSpec``s (int8 layers dequantized, sparse ones densified)."""
    return [LayerSpec(name, layer.dense_weights().astype(np.float32), layer.bias_vector().astype(np.float32),
                      layer.activation) for name, layer in zip(plan.layer_names, plan.layers)]


def build_sequential(input_shape: tuple[int, ...], specs: list[LayerSpec]) -> Any:
    """A Keras Sequential computing exactly the specs: [Flatten,] Dense(N, activation) per layer."""
    from leanserve.server.ingest.keras_loader import import_keras

    keras = import_keras()
    layers: list[Any] = [keras.Input(tuple(input_shape), name="input")]
    if len(input_shape) > 1:
        layers.append(keras.layers.Flatten())
    for i, s in enumerate(specs):
        layers.append(keras.layers.Dense(s.weights.shape[1], activation=s.activation, name=f"dense_{i}"))
    model = keras.Sequential(layers)
    for layer, s in zip(dense_layers(model), specs):
        layer.set_weights([s.weights, s.bias])
    return model


def dense_layers(model: Any) -> list[Any]:
    """The model's Dense layers in order (the ones pruning masks), nested models included."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out.extend(dense_layers(layer))
        elif type(layer).__name__ == "Dense":
            out.append(layer)
    return out


def trainable_model(plan: Plan, manifest: Manifest, folder: Path, settings: Settings) -> tuple[Any, str]:
    """(Keras model, where it came from). The uploaded .keras/.h5 keeps what the Plan folded away (Dropout,
    BatchNormalization statistics) for training; the fp32 rebuild serves leanserve-format and optimized versions.
    The source is used only when its Dense chain matches the plan's layers one to one."""
    source = manifest.source
    if source is not None and source.format in ("keras", "h5") and source.file and (folder / source.file).is_file():
        from leanserve.server.ingest.keras_loader import load_keras, settings_limits

        model = load_keras(folder / source.file, **settings_limits(folder / source.file, settings))
        dense = dense_layers(model)
        if [d.kernel.shape[1] for d in dense] == [layer.out_features for layer in plan.layers]:
            return model, f"source file {source.file}"
        log.info("source model's Dense chain differs from the plan; fine-tuning a rebuilt Sequential")
    return build_sequential(plan.input_shape, plan_specs(plan)), "rebuilt from the plan's fp32 weights"


def specs_from_keras(model: Any) -> list[LayerSpec]:
    """Fold the (fine-tuned) Keras model back into specs (BatchNormalization folded, Dropout dropped)."""
    from leanserve.server.ingest.keras_to_plan import keras_to_specs

    return keras_to_specs(model)[1]


def keras_of_plan(plan: Plan) -> Any:
    """A Keras model computing with the plan's effective (pruned, dequantized) weights: the TF reference."""
    return build_sequential(plan.input_shape, plan_specs(plan))
