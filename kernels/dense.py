"""Format ``dense_f32``: fp32 weights, fused ``act(x @ W + b)``.

A Numba kernel over weights packed in panels (``_simd.pack_panels``): batch 1 streams the packed weights exactly
once, contiguously; larger batches use a register tile of up to 4 rows (fp32 FMA), so each weight vector loaded
serves every row of the tile and the accumulators stay in registers: 64-channel panels and a 4 x 64 tile on AVX-512,
16-channel panels and a 4 x 16 tile on AVX2, whose 16 registers the larger tile would spill (``_simd._f32_layout``).

Where the crossover to BLAS lies depends on the machine and the shape: ``bench/kernels.py`` has this kernel ahead of
``numpy.dot`` + epilogue (1 thread) at batches 1-32 on both kinds of host, and OpenBLAS ahead at batch 128 for some
large layers on AVX2.
``numpy_min_batch=M`` routes batches of ``M`` rows or more to GEMM + a Numba epilogue and keeps a Keras-layout copy
of the weights (``M=1``: every batch, and no panels are packed). The server's load-time tuner measures the choices
on the machine it runs on (server/runtime/tuning.py); the default here is the panel kernel at every batch.

``dense_f32_chain`` runs several such layers in one call (``DenseF32Chain``, built by ``fuse_dense_chains``): a
small model's request pays one Numba dispatch, one output allocation and one GIL release instead of one per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from leanserve.kernels._simd import (F32_PANEL, F32_TILE_NV, LANES, MAX_MR, PANEL, f32_tile, pack_panels,
                                      unpack_panels)
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
    vectors = (N + LANES - 1) // LANES  # of 16 channels
    per_panel = F32_PANEL // LANES
    # a tile's vectors lie in one panel, or one per panel (panels of one vector)
    vstride = LANES if per_panel > 1 else F32_PANEL * K
    width = F32_TILE_NV[min(MAX_MR, B)]
    v0 = 0
    while v0 < vectors:
        p0, first = v0 // per_panel, v0 % per_panel
        nv = min(width, vectors - v0) if per_panel == 1 else min(width, vectors - v0, per_panel - first)
        ldw = min(per_panel, vectors - p0 * per_panel) * LANES  # the last panel may be narrower
        w_off = p0 * F32_PANEL * K + first * LANES  # every earlier panel is full
        c0 = v0 * LANES
        cols = min(nv * LANES, N - c0)
        for r0 in range(0, B, MAX_MR):
            mr = min(MAX_MR, B - r0)
            f32_tile(x, r0 * K, K, wp, w_off, ldw, vstride, tile, K, mr, nv)
            for r in range(mr):
                base = r * nv * LANES
                for j in range(cols):
                    out[r0 + r, c0 + j] = tile[base + j] + bias[c0 + j]
        v0 += nv
    if code != 0:
        for r in range(B):
            activate_row(out[r], code)


@njit(nogil=True, cache=True)
def dense_f32_chain(x: np.ndarray, packed: np.ndarray, w_starts: np.ndarray, biases: np.ndarray, b_starts: np.ndarray,
                    codes: np.ndarray, out: np.ndarray) -> None:
    """Several ``dense_f32`` layers in one call: layer ``i`` reads ``packed[w_starts[i]:w_starts[i + 1]]`` and
    ``biases[b_starts[i]:b_starts[i + 1]]``; the last writes ``out``. One dispatch (and one GIL release) for the
    chain instead of one per layer; the intermediate rows live only inside the call."""
    B = x.shape[0]
    last = codes.shape[0] - 1
    n = b_starts[1] - b_starts[0]
    h = out if last == 0 else np.empty((B, n), dtype=np.float32)
    dense_f32_forward(x, packed[w_starts[0]:w_starts[1]], biases[b_starts[0]:b_starts[1]], codes[0], h)
    for i in range(1, last + 1):
        n = b_starts[i + 1] - b_starts[i]
        o = out if i == last else np.empty((B, n), dtype=np.float32)
        dense_f32_forward(h, packed[w_starts[i]:w_starts[i + 1]], biases[b_starts[i]:b_starts[i + 1]], codes[i], o)
        h = o


class DenseF32Chain:
    """Consecutive ``DenseF32`` layers run by one ``dense_f32_chain`` call (batches below every layer's
    ``numpy_min_batch``; larger ones go layer by layer). The layers' packed weights and biases move into one buffer
    each and the layers keep views into them, so nothing is held twice."""

    def __init__(self, layers: list["DenseF32"]) -> None:
        if len(layers) < 2 or any(not _chains(layer) for layer in layers):
            raise KernelInputError("a dense_f32 chain needs two or more DenseF32 layers that use the panel kernel")
        for a, b in zip(layers, layers[1:]):
            if a.out_features != b.in_features:
                raise KernelInputError(f"layer widths do not chain: {a.out_features} -> {b.in_features}")
        self.layers = list(layers)
        self.out_features = layers[-1].out_features
        self._min_batch = min(layer.numpy_min_batch for layer in layers)
        self._w_starts = np.cumsum([0] + [layer._packed.size for layer in layers], dtype=np.int64)
        self._b_starts = np.cumsum([0] + [layer.out_features for layer in layers], dtype=np.int64)
        self._packed = np.concatenate([layer._packed for layer in layers])
        self._biases = np.concatenate([layer._bias for layer in layers])
        self._codes = np.array([layer._code for layer in layers], dtype=np.int64)
        for i, layer in enumerate(layers):
            layer._packed = self._packed[self._w_starts[i]:self._w_starts[i + 1]]
            layer._bias = self._biases[self._b_starts[i]:self._b_starts[i + 1]]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The chain on float32 C-contiguous ``x[B, K]`` (unchecked, as ``LayerKernel.__call__``)."""
        if x.shape[0] >= self._min_batch:
            for layer in self.layers:
                x = layer(x)
            return x
        out = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        dense_f32_chain(x, self._packed, self._w_starts, self._biases, self._b_starts, self._codes, out)
        return out


def fuse_dense_chains(layers: list[LayerKernel]) -> list[Callable[[np.ndarray], np.ndarray]]:
    """The callables that run ``layers`` in order: each run of two or more consecutive ``DenseF32`` layers becomes
    one ``DenseF32Chain``, every other layer stays itself."""
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    run: list[DenseF32] = []
    for layer in [*layers, None]:
        if _chains(layer) and (not run or run[-1].out_features == layer.in_features):
            run.append(layer)
            continue
        steps.extend([DenseF32Chain(run)] if len(run) > 1 else run)
        run = [layer] if _chains(layer) else []
        if layer is not None and not _chains(layer):
            steps.append(layer)
    return steps


def _chains(layer: object) -> bool:
    return type(layer) is DenseF32 and layer.uses_panels


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
        # The panels only when some batch runs the Numba kernel (numpy_min_batch 1 = every batch on GEMM); the
        # Keras layout only when the GEMM path can run (otherwise unpacked on demand, rarely needed).
        self._packed: np.ndarray | None = pack_panels(weights, panel=F32_PANEL) if self.numpy_min_batch > 1 else None
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
        return unpack_panels(self._packed, self.in_features, self.out_features, panel=F32_PANEL)

    @property
    def uses_panels(self) -> bool:
        """True when small batches run the Numba panel kernel (so the layer can join a ``DenseF32Chain``)."""
        return self._packed is not None

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
        if self._packed is not None:
            dense_f32_forward(x, self._packed, self._bias, self._code, out)
        bias_activate_rows(out, self._bias, self._code)
        super().warmup(batch_sizes)
