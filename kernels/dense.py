"""Format ``dense_f32``: fp32 weights, fused ``act(x @ W + b)``.

A Numba kernel over weights packed in 64-channel panels (``_simd.pack_panels``): batch 1 streams the packed
weights exactly once, contiguously; larger batches use a 4-row x 64-channel register tile (fp32 FMA), so each
weight vector loaded serves 4 rows and the tile's 16 accumulators stay in registers.

Single-threaded, this kernel has beaten ``numpy.dot`` + epilogue at every batch 1..128 on every shape
``bench/kernels.py`` tries (the gap is largest at small batches, where BLAS call overhead dominates), so Numba is the
default at every batch.
``numpy_min_batch=M`` routes batches of ``M`` rows or more to OpenBLAS GEMM + a Numba epilogue (e.g. for a
machine where a multithreaded BLAS wins); that keeps a Keras-layout copy of the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from leanserve.kernels._simd import LANES, MAX_MR, PANEL, f32_tile, pack_panels, unpack_panels
from leanserve.kernels.activations import activate_row, activation_code, bias_activate_rows
from leanserve.kernels.formats import (KernelInputError, LayerKernel, check_activation, meta_activation, meta_int,
                                       stored_array)

DEFAULT_NUMPY_MIN_BATCH = 1 << 62  # i.e. never: see the module docstring


@njit(nogil=True, cache=True)
def dense_f32_forward(x: np.ndarray, wp: np.ndarray, bias: np.ndarray, code: int, out: np.ndarray) -> None:
    """``out[B, N] = act(x[B, K] @ W + bias)`` with ``W`` packed by ``pack_panels`` (serial, nogil)."""
    B, K = x.shape
    N = out.shape[1]
    tile = np.empty(MAX_MR * PANEL, dtype=np.float32)
    for n0 in range(0, N, PANEL):
        width = min(PANEL, N - n0)
        nv = (width + LANES - 1) // LANES
        w_off = n0 * K  # every earlier panel is full: PANEL channels x K
        for r0 in range(0, B, MAX_MR):
            mr = min(MAX_MR, B - r0)
            f32_tile(x, r0 * K, K, wp, w_off, tile, K, mr, nv)
            for r in range(mr):
                base = r * nv * LANES
                for j in range(width):
                    out[r0 + r, n0 + j] = tile[base + j] + bias[n0 + j]
    if code != 0:
        for r in range(B):
            activate_row(out[r], code)


class DenseF32(LayerKernel):
    """fp32 dense layer (Numba panel kernel for small batches, OpenBLAS GEMM + Numba epilogue for large)."""

    format = "dense_f32"

    def __init__(self, weights: np.ndarray, bias: np.ndarray, activation: str, numpy_min_batch: int | None = None):
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if weights.ndim != 2 or bias.shape != (weights.shape[1],):
            raise KernelInputError(f"weights [K, N] and bias [N] expected, got {weights.shape} and {bias.shape}")
        self.activation = check_activation(activation)
        self.in_features, self.out_features = (int(d) for d in weights.shape)
        self._bias = bias
        self._code = activation_code(activation)
        self.numpy_min_batch = DEFAULT_NUMPY_MIN_BATCH if numpy_min_batch is None else int(numpy_min_batch)
        self._packed = pack_panels(weights)
        # Keep the Keras layout only when the GEMM path can run; otherwise unpack on demand (rarely needed).
        self._w: np.ndarray | None = weights if self.numpy_min_batch < DEFAULT_NUMPY_MIN_BATCH else None

    @classmethod
    def from_dense(cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any) -> "DenseF32":
        return cls(weights, bias, activation, **options)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "DenseF32":
        k, n = meta_int(meta, "in_features"), meta_int(meta, "out_features")
        min_batch = meta.get("numpy_min_batch")
        if min_batch is not None:
            min_batch = meta_int(meta, "numpy_min_batch", 1, DEFAULT_NUMPY_MIN_BATCH)
        weights = stored_array(arrays, "weights", (np.float32,), (k, n))
        bias = stored_array(arrays, "bias", (np.float32,), (n,))
        return cls(weights, bias, meta_activation(meta), min_batch)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.dense_weights(), "bias": self._bias}

    def meta(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "numpy_min_batch": None if self._w is None else self.numpy_min_batch,
        }

    def dense_weights(self) -> np.ndarray:
        if self._w is not None:
            return self._w
        return unpack_panels(self._packed, self.in_features, self.out_features)

    @property
    def nbytes(self) -> int:
        """Bytes persisted by ``arrays()`` (Keras-layout fp32 weights + bias), without unpacking them."""
        return 4 * (self.in_features * self.out_features + self.out_features)

    def bias_vector(self) -> np.ndarray:
        return self._bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._w is not None and x.shape[0] >= self.numpy_min_batch:
            out = np.dot(x, self._w)
            bias_activate_rows(out, self._bias, self._code)
            return out
        out = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        dense_f32_forward(x, self._packed, self._bias, self._code, out)
        return out

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Compile both paths (Numba panel kernel and the GEMM epilogue) whatever the batch sizes given."""
        x = np.zeros((1, self.in_features), dtype=np.float32)
        out = np.empty((1, self.out_features), dtype=np.float32)
        dense_f32_forward(x, self._packed, self._bias, self._code, out)
        bias_activate_rows(out, self._bias, self._code)
        super().warmup(batch_sizes)
