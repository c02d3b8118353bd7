"""A compiled Plan: the chain of dense layers a converted model becomes, executed with kernels/.

A Plan takes one float32 input of shape ``[B, *input_shape]``, flattens it to ``[B, K]`` and runs each layer's
``LayerKernel`` in turn (bias and activation fused by the kernel). It holds no protobuf and no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leanserve.kernels import (QUANTIZED_INPUT_FORMATS, LayerKernel, activate_numpy, fuse_dense_chains, get_format,
                               quantize_rows)


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer before it is prepared for a format: fp32 weights ``[K, N]``, bias ``[N]``, activation."""

    name: str
    weights: np.ndarray
    bias: np.ndarray
    activation: str


@dataclass
class Plan:
    """A ready-to-run chain of prepared layers (fixed once built: consecutive fp32 dense layers are fused into one
    kernel call at construction)."""

    input_shape: tuple[int, ...]
    layers: list[LayerKernel]
    layer_names: list[str]
    #: per layer: the autotune record (candidate format -> seconds per batch size), empty when not tuned
    tuning: list[dict[str, Any]] = field(default_factory=list)
    _steps: list[Callable[[np.ndarray], np.ndarray]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._steps = fuse_dense_chains(self.layers)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def out_features(self) -> int:
        return self.layers[-1].out_features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Run the plan on float32 ``x[B, *input_shape]`` (already validated by the caller)."""
        h = x
        if x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
            h = np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=np.float32)
        for step in self._steps:
            h = step(h)
        return h

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Touch every kernel specialisation so the first request pays no compilation: writable inputs and
        read-only ones (a request's tensor is a view of the message's bytes; Numba compiles each kind apart)."""
        for batch in batch_sizes:
            x = np.zeros((batch, *self.input_shape), dtype=np.float32)
            self(x)
            x.flags.writeable = False
            self(x)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The same computation in plain numpy float64 on the effective weights (the kernels' oracle).

        Layers that quantize their input per call get the identical input quantization here, so the reference
        differs from the kernels only by float rounding, not by the (intended) quantization error.
        """
        h = x.reshape(x.shape[0], -1).astype(np.float64)
        for layer in self.layers:
            if layer.format in QUANTIZED_INPUT_FORMATS:
                h = quantize_dequantize_rows(h)
            h = activate_numpy(h @ layer.dense_weights().astype(np.float64) + layer.bias_vector(), layer.activation)
        return h.astype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(sum(layer.nbytes for layer in self.layers))

    def describe(self) -> list[dict[str, Any]]:
        """Per layer: name, format, shape, activation, density, bytes and the tuning record."""
        out = []
        for i, (name, layer) in enumerate(zip(self.layer_names, self.layers)):
            w = layer.dense_weights()
            out.append(
                {
                    "name": name,
                    "format": layer.format,
                    "in_features": layer.in_features,
                    "out_features": layer.out_features,
                    "activation": layer.activation,
                    "sparsity": float(1.0 - np.count_nonzero(w) / max(w.size, 1)),
                    "bytes": layer.nbytes,
                    "tuning": self.tuning[i] if i < len(self.tuning) else {},
                }
            )
        return out


def build_plan(input_shape: tuple[int, ...], specs: list[LayerSpec], formats: list[str] | None = None) -> Plan:
    """Prepare every layer in the requested format (``dense_f32`` by default)."""
    formats = formats or ["dense_f32"] * len(specs)
    layers = [get_format(fmt).from_dense(s.weights, s.bias, s.activation) for s, fmt in zip(specs, formats)]
    return Plan(input_shape=tuple(input_shape), layers=layers, layer_names=[s.name for s in specs])


def quantize_dequantize_rows(h: np.ndarray) -> np.ndarray:
    """``h`` after the kernels' per-row int8 activation quantization, as float64."""
    x = np.ascontiguousarray(h, dtype=np.float32)
    q = np.empty(x.shape, dtype=np.int8)
    scales = np.empty(x.shape[0], dtype=np.float32)
    quantize_rows(x, q, scales)
    return q.astype(np.float64) * scales.astype(np.float64)[:, None]
