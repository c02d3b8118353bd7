"""The checked public kernel API: validate inputs, then prepare or run a layer in any registered format.

``prepare`` builds a reusable ``LayerKernel`` (do this once per layer); ``dense`` is a one-shot convenience
that prepares and runs. Invalid inputs raise ``KernelInputError`` with a message naming the problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leanserve.kernels.formats import KernelInputError, LayerKernel, check_activation
from leanserve.kernels.registry import get_format


def check_layer(weights: Any, bias: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``weights[K, N]`` and ``bias[N]`` (real floating point, finite); return float32 C-contiguous copies
    or views. Raises ``KernelInputError``."""
    for name, arr in (("weights", weights), ("bias", bias)):
        if not isinstance(arr, np.ndarray):
            raise KernelInputError(f"{name} must be a numpy array, got {type(arr).__name__}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise KernelInputError(f"{name} must be floating point, got {arr.dtype}")
    if weights.ndim != 2 or weights.shape[0] < 1 or weights.shape[1] < 1:
        raise KernelInputError(f"weights must be a non-empty [K, N] matrix, got shape {list(weights.shape)}")
    if bias.shape != (weights.shape[1],):
        raise KernelInputError(f"bias must have shape [{weights.shape[1]}] (N), got {list(bias.shape)}")
    w = np.ascontiguousarray(weights, dtype=np.float32)
    b = np.ascontiguousarray(bias, dtype=np.float32)
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise KernelInputError("weights and bias must be finite (no NaN or inf), also after conversion to float32")
    return w, b


def prepare(
    format: str, weights: np.ndarray, bias: np.ndarray, activation: str = "linear", **options: Any
) -> LayerKernel:
    """Validate and build ``act(x @ weights + bias)`` in ``format`` (see ``available_formats()``); options go to the
    format's ``from_dense`` (e.g. ``path="portable"`` for int8)."""
    w, b = check_layer(weights, bias)
    check_activation(activation)
    try:
        return get_format(format).from_dense(w, b, activation, **options)
    except TypeError as exc:  # an option the format does not take
        raise KernelInputError(f"bad options for format {format!r}: {exc}") from None


def dense(
    x: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    activation: str = "linear",
    format: str = "dense_f32",
    **options: Any,
) -> np.ndarray:
    """One-shot checked ``act(x @ weights + bias)`` for float32 ``x[B, K]``; returns float32 ``[B, N]``.

    Prepares the layer on every call: for repeated use, ``prepare`` once and call ``kernel.run(x)``."""
    kernel = prepare(format, weights, bias, activation, **options)
    return kernel.run(x)
