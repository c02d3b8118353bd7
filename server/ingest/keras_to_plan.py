"""Convert a Keras chain of Dense layers into ``LayerSpec``s a Plan can run.

Inference-only layers are folded away: Dropout disappears, BatchNormalization is folded into the adjacent Dense
(``x*s + t`` with ``s = gamma/sqrt(var+eps)``, ``t = beta - mean*s``), separate activations fuse into the
Dense before them, and a leading Flatten becomes the plan's input reshape. Anything else raises
``UnsupportedModel`` naming the layer, so the caller can fall back to the TensorFlow runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from leanserve.server.errors import UnsupportedModel
from leanserve.server.runtime.plan import LayerSpec

PLAN_ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")


def model_signature(model: Any) -> dict[str, dict[str, Any]]:
    """Input and output of a single-input, single-output Keras model (shapes without the batch dim).

    Returns ``{"input": {"name", "shape", "dtype"}, "output": {"name", "shape", "dtype"}}`` with shapes as
    lists (JSON-ready; ``None`` marks an undefined dim).
    """
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError) as exc:
        raise UnsupportedModel(f"model has no defined inputs (build it from keras.Input): {exc}") from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise UnsupportedModel(
            f"only single-input single-output models are served; got {len(inputs)} inputs, {len(outputs)} outputs"
        )
    inp, out = inputs[0], outputs[0]
    return {
        "input": {"name": _tensor_name(inp), "shape": list(inp.shape[1:]), "dtype": str(inp.dtype)},
        "output": {"name": _tensor_name(out), "shape": list(out.shape[1:]), "dtype": str(out.dtype)},
    }


def _tensor_name(tensor: Any) -> str:
    history = getattr(tensor, "_keras_history", None)
    if history is not None:
        return str(history.operation.name)
    return str(tensor.name)


@dataclass
class _Dense:
    name: str
    weights: np.ndarray  # float64 while folding, [K, N]
    bias: np.ndarray
    activation: str

    def spec(self) -> LayerSpec:
        return LayerSpec(
            name=self.name,
            weights=np.ascontiguousarray(self.weights, dtype=np.float32),
            bias=np.ascontiguousarray(self.bias, dtype=np.float32),
            activation=self.activation,
        )


def keras_to_specs(model: Any) -> tuple[tuple[int, ...], list[LayerSpec]]:
    """Convert a Sequential or functional linear chain into ``(input_shape, specs)`` for ``build_plan``.

    ``input_shape`` excludes the batch dim (e.g. ``(8, 8)`` for a model starting with Flatten). Raises
    ``UnsupportedModel`` naming the first layer the Plan cannot express and why.
    """
    signature = model_signature(model)
    shape = signature["input"]["shape"]
    if signature["input"]["dtype"] != "float32":
        raise UnsupportedModel(f"input dtype is {signature['input']['dtype']}; the Plan serves float32 only")
    if any(not isinstance(d, int) for d in shape) or not shape:
        raise UnsupportedModel(f"input shape {shape} must be fully defined (apart from the batch dim)")
    input_shape = tuple(int(d) for d in shape)

    builder = _ChainBuilder(flat=len(input_shape) == 1)
    for layer in _chain_layers(model):
        builder.add(layer)
    return input_shape, builder.finish()


def _chain_layers(model: Any) -> list[Any]:
    """The model's layers in order, after checking they form one linear chain."""
    keras = _keras()
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers:
        if isinstance(layer, keras.Model):
            raise UnsupportedModel(f"layer {layer.name!r} is a nested model; flatten it into one chain")
    if isinstance(model, keras.Sequential):
        return layers
    if type(model).__name__ != "Functional":
        raise UnsupportedModel(f"{type(model).__name__} is a subclassed model; only Sequential/functional chains")
    # Walk back from the output through single-input nodes; a linear chain visits every layer exactly once.
    chain: list[Any] = []
    tensor = model.outputs[0]
    while True:
        history = tensor._keras_history
        op = history.operation
        if isinstance(op, keras.layers.InputLayer):
            break
        node = op._inbound_nodes[history.node_index]
        if len(node.input_tensors) != 1:
            raise UnsupportedModel(f"layer {op.name!r} takes {len(node.input_tensors)} inputs: not a linear chain")
        chain.append(op)
        tensor = node.input_tensors[0]
    chain.reverse()
    if [id(x) for x in chain] != [id(x) for x in layers]:
        raise UnsupportedModel("the model is not a linear chain of layers (branches, skips or shared layers)")
    return layers


class _ChainBuilder:
    """Folds the layer sequence into dense specs; ``current`` is the Dense still open for fusing/folding."""

    def __init__(self, *, flat: bool) -> None:
        self.flat = flat
        self.specs: list[LayerSpec] = []
        self.current: _Dense | None = None
        # A BatchNormalization with no linear Dense before it, as (scale, shift): folds into the next Dense.
        self.pending: tuple[np.ndarray, np.ndarray, str] | None = None
        self.seen_any = False

    def add(self, layer: Any) -> None:
        keras = _keras()
        L = keras.layers
        where = f"layer {layer.name!r} ({type(layer).__name__})"
        policy = getattr(getattr(layer, "dtype_policy", None), "name", "float32")
        if policy != "float32":
            raise UnsupportedModel(f"{where}: dtype policy {policy}; the Plan computes in float32")
        if isinstance(layer, L.Flatten):
            self._flatten(layer, where)
        elif isinstance(layer, L.Dense):
            self._dense(layer, where)
        elif isinstance(layer, L.BatchNormalization):
            self._batchnorm(layer, where)
        elif isinstance(layer, L.Dropout):
            pass  # identity at inference
        elif isinstance(layer, L.Activation):
            self._activation(_activation_name(layer.get_config()["activation"], where), where)
        elif isinstance(layer, L.ReLU):
            cfg = layer.get_config()
            if cfg.get("max_value") is not None or cfg.get("negative_slope") or cfg.get("threshold"):
                raise UnsupportedModel(f"{where}: only plain ReLU (no max_value/negative_slope/threshold)")
            self._activation("relu", where)
        elif isinstance(layer, L.Softmax):
            axis = layer.get_config().get("axis", -1)
            if axis not in (-1, [-1], 1, [1]):
                raise UnsupportedModel(f"{where}: softmax over axis {axis}; only the last axis is supported")
            self._activation("softmax", where)
        else:
            raise UnsupportedModel(f"{where}: layer type not supported by the Plan converter")
        self.seen_any = True

    def _flatten(self, layer: Any, where: str) -> None:
        if self.seen_any:
            raise UnsupportedModel(f"{where}: Flatten is only supported as the first layer")
        if layer.get_config().get("data_format") == "channels_first":
            raise UnsupportedModel(f"{where}: channels_first Flatten transposes its input; unsupported")
        self.flat = True

    def _dense(self, layer: Any, where: str) -> None:
        if not self.flat:
            raise UnsupportedModel(f"{where}: Dense on a multi-dimensional input (add a leading Flatten)")
        if getattr(layer, "quantization_mode", None):
            raise UnsupportedModel(f"{where}: Keras-quantized Dense ({layer.quantization_mode}) unsupported")
        weights = np.asarray(layer.kernel.numpy(), dtype=np.float64)
        bias = (
            np.asarray(layer.bias.numpy(), dtype=np.float64)
            if layer.use_bias
            else np.zeros(weights.shape[1], dtype=np.float64)
        )
        if self.pending is not None:
            scale, shift, _ = self.pending
            # (x*s + t) @ W + b == x @ (s[:, None] * W) + (t @ W + b)
            bias = shift @ weights + bias
            weights = scale[:, None] * weights
            self.pending = None
        self._close()
        activation = _activation_name(layer.get_config()["activation"], where)
        self.current = _Dense(layer.name, weights, bias, activation)

    def _batchnorm(self, layer: Any, where: str) -> None:
        if not self.flat:
            raise UnsupportedModel(f"{where}: BatchNormalization on a multi-dimensional input")
        axis = layer.axis if isinstance(layer.axis, int) else (list(layer.axis) or [None])[0]
        if not (axis in (-1, 1) and (isinstance(layer.axis, int) or len(layer.axis) == 1)):
            raise UnsupportedModel(f"{where}: BatchNormalization over axis {layer.axis}; only the feature axis")
        mean = np.asarray(layer.moving_mean.numpy(), dtype=np.float64)
        var = np.asarray(layer.moving_variance.numpy(), dtype=np.float64)
        gamma = np.asarray(layer.gamma.numpy(), dtype=np.float64) if layer.scale else np.ones_like(mean)
        beta = np.asarray(layer.beta.numpy(), dtype=np.float64) if layer.center else np.zeros_like(mean)
        scale = gamma / np.sqrt(var + float(layer.epsilon))
        shift = beta - mean * scale
        if self.current is not None and self.current.activation == "linear" and self.pending is None:
            self.current.weights = self.current.weights * scale[None, :]
            self.current.bias = self.current.bias * scale + shift
        elif self.pending is not None:
            s0, t0, first = self.pending
            self.pending = (s0 * scale, t0 * scale + shift, first)
        else:
            self._close()
            self.pending = (scale, shift, where)

    def _activation(self, activation: str, where: str) -> None:
        if activation == "linear":
            return
        if self.pending is not None:
            raise UnsupportedModel(
                f"{where}: activation after a BatchNormalization that has no linear Dense before it; cannot fold"
            )
        if self.current is None:
            raise UnsupportedModel(f"{where}: activation without a Dense before it")
        if self.current.activation != "linear":
            raise UnsupportedModel(
                f"{where}: follows Dense {self.current.name!r} that already applies {self.current.activation!r}"
            )
        self.current.activation = activation

    def _close(self) -> None:
        if self.current is not None:
            self.specs.append(self.current.spec())
            self.current = None

    def finish(self) -> list[LayerSpec]:
        if self.pending is not None:
            raise UnsupportedModel(f"{self.pending[2]}: BatchNormalization with no Dense after it to fold into")
        self._close()
        if not self.specs:
            raise UnsupportedModel("model has no Dense layer")
        return self.specs


def _activation_name(value: Any, where: str) -> str:
    name = value if isinstance(value, str) else getattr(value, "__name__", repr(value))
    if name not in PLAN_ACTIVATIONS:
        raise UnsupportedModel(
            f"{where}: activation {name!r} unsupported; the Plan fuses {', '.join(PLAN_ACTIVATIONS)}"
        )
    return name


def _keras() -> Any:
    from leanserve.server.ingest.keras_loader import import_keras

    return import_keras()
