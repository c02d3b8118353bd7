"""Fused activations for kernel epilogues, as Numba helpers working in place on one output row.

Kernels pass an ``int`` activation code (``ACTIVATION_CODES[name]``) so one compiled epilogue serves every
activation. All helpers are ``nogil`` serial Numba functions, safe to call from many threads at once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from leanserve.kernels.formats import ACTIVATIONS, check_activation

#: activation name -> code passed to the Numba helpers (stable; other kernel modules rely on these values)
ACTIVATION_CODES: dict[str, int] = {name: code for code, name in enumerate(ACTIVATIONS)}
LINEAR, RELU, SIGMOID, TANH, SOFTMAX = (ACTIVATION_CODES[n] for n in ACTIVATIONS)


def activation_code(activation: str) -> int:
    """The code for ``activation``; raises ``KernelInputError`` for an unknown name."""
    return ACTIVATION_CODES[check_activation(activation)]


@njit(nogil=True, cache=True)
def activate_row(row: np.ndarray, code: int) -> None:
    """Apply activation ``code`` in place to a float32 1-D ``row`` (softmax normalises over the row)."""
    n = row.shape[0]
    if code == RELU:
        for j in range(n):
            if row[j] < 0.0:
                row[j] = 0.0
    elif code == SIGMOID:
        for j in range(n):
            v = row[j]
            # Split on sign so exp never overflows to inf/inf.
            if v >= 0.0:
                row[j] = np.float32(1.0) / (np.float32(1.0) + np.exp(-v))
            else:
                e = np.exp(v)
                row[j] = e / (np.float32(1.0) + e)
    elif code == TANH:
        for j in range(n):
            row[j] = np.tanh(row[j])
    elif code == SOFTMAX:
        m = row[0]
        for j in range(1, n):
            if row[j] > m:
                m = row[j]
        s = np.float32(0.0)
        for j in range(n):
            e = np.exp(row[j] - m)
            row[j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(n):
            row[j] *= inv


@njit(nogil=True, cache=True)
def bias_activate_rows(out: np.ndarray, bias: np.ndarray, code: int) -> None:
    """``out[r, :] = act(out[r, :] + bias)`` in place for every row of a float32 2-D ``out``."""
    for r in range(out.shape[0]):
        row = out[r]
        for j in range(row.shape[0]):
            row[j] += bias[j]
        activate_row(row, code)


def activate_numpy(h: np.ndarray, activation: str) -> np.ndarray:
    """Numpy reference of the fused activations (any float dtype, per-row softmax); for tests and fallbacks."""
    check_activation(activation)
    if activation == "relu":
        return np.maximum(h, 0)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):  # exp(-h) → inf for very negative h gives the right limit, 0
            return 1 / (1 + np.exp(-h))
    if activation == "tanh":
        return np.tanh(h)
    if activation == "softmax":
        e = np.exp(h - h.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return h
