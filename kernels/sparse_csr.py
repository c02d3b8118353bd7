"""Unstructured sparse formats: ``csr_f32`` and ``csr_int8`` (CSR of ``W^T``: one stored row per output channel).

Gather form (per output, the nonzero k's) rather than scatter (per input, the outputs it feeds): the output's
sum stays in registers and batches vectorise over the batch lanes of a transposed ``x``.

* Batch 1 (below ``LANES_MIN_BATCH`` / ``INT_LANES_MIN_BATCH``, 2 or 3 by the CPU): each sparse row is one
  ``csr_gather_dot``: 16 nonzeros per step, ``x`` gathered with one ``vgatherdps`` (fp32) / ``vpgatherdd`` (int8:
  ``x`` quantized to int16) into 16 partial sums, tree-reduced per row. Both are gather-throughput bound, not
  memory bound (a scalar loop was slower: LLVM turned its int8 form into 64-bit-index gathers).
* From there: ``x`` is transposed once into ``[K, Bp]`` (fp32, or int16 for int8) and every stored weight
  feeds 16..64 batch lanes with one FMA (``csr_lanes_f32``) or one sign-extending int32 multiply-add
  (``lanes_i32``, exact). On large layers csr_int8 beats csr_f32 at batch >= 2 (half the weight bytes, int16
  ``x^T``); on small ones its quantize + transpose can make it slower (``bench/kernels.py`` measures both).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from leanserve.kernels._csr_simd import csr_gather_dot, lanes_i32
from leanserve.kernels._simd import has_avx512f
from leanserve.kernels._sparse_simd import csr_lanes_f32
from leanserve.kernels.activations import activation_code
from leanserve.kernels.formats import (KernelInputError, LayerKernel, check_activation, meta_activation, meta_int,
                                       stored_array)
from leanserve.kernels.quantize import quantize_rows, quantize_weights_per_channel
from leanserve.kernels.sparse_common import (INDEX_DTYPES, INDPTR_DTYPES, check_block_arrays, epilogue_f32,
                                             epilogue_int, index_dtype)

#: batch size from which csr_f32 switches from per-row gathers to batch-lane SIMD (measured crossovers: with AVX-512
#: the 16 batch lanes fill one register, from 2 rows; with AVX2 two, and 2 rows run 1.0-1.8x faster as gathers)
LANES_MIN_BATCH = 2 if has_avx512f() else 3
#: the same for csr_int8 (int16 lanes; the same crossovers)
INT_LANES_MIN_BATCH = LANES_MIN_BATCH


def pack_csr(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of ``w.T`` keeping exactly the nonzeros: (indptr int32 [N+1], indices uint16/32, values)."""
    K, N = w.shape
    rows, cols = np.nonzero(w.T)
    indptr = np.zeros(N + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=N), out=indptr[1:])
    return indptr, cols.astype(index_dtype(K)), np.ascontiguousarray(w.T[rows, cols])


def unpack_csr(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, K: int, N: int) -> np.ndarray:
    """Dense ``[K, N]`` from ``pack_csr`` arrays."""
    w = np.zeros((K, N), dtype=values.dtype)
    w[indices.astype(np.int64), np.repeat(np.arange(N), np.diff(indptr))] = values
    return w


@njit(nogil=True, cache=True, boundscheck=False)
def csr_rows_f32(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, x: np.ndarray, acc: np.ndarray) -> None:
    """``acc[b, n] = sum_p values[p] * x[b, indices[p]]`` row by row, 16 nonzeros per ``vgatherdps`` step
    (streams the weights once per batch row; ``x`` C-contiguous)."""
    B, K = x.shape
    N = indptr.shape[0] - 1
    for b in range(B):
        for n in range(N):
            acc[b, n] = csr_gather_dot(indices, values, indptr[n], indptr[n + 1], x, b * K)


@njit(nogil=True, cache=True, boundscheck=False)
def csr_lanes(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, x: np.ndarray, acc_t: np.ndarray) -> None:
    """``acc_t[n, b] = sum_p values[p] * x[b, indices[p]]`` with SIMD over batch lanes; ``acc_t`` is
    ``[N, Bp]`` with ``Bp`` the batch rounded up to 16."""
    B, K = x.shape
    N, Bp = acc_t.shape
    xt = np.zeros((K, Bp), dtype=np.float32)
    for b in range(B):
        for k in range(K):
            xt[k, b] = x[b, k]
    for b0 in range(0, Bp, 64):  # 64 lanes of x^T: K * 256 B, stays in L2 while all rows stream past it
        nv = min(4, (Bp - b0) // 16)
        for n in range(N):
            csr_lanes_f32(indices, values, indptr[n], indptr[n + 1], xt, Bp, b0, acc_t, n * Bp + b0, nv)


@njit(nogil=True, cache=True)
def csr_f32_forward(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, bias: np.ndarray, code: int,
                    x: np.ndarray, lanes_min_batch: int) -> np.ndarray:
    """``act(x @ W + b)`` for CSR fp32 weights; picks the per-row or batch-lane kernel by batch size."""
    B = x.shape[0]
    N = indptr.shape[0] - 1
    out = np.empty((B, N), dtype=np.float32)
    if B >= lanes_min_batch:
        acc_t = np.empty((N, (B + 15) // 16 * 16), dtype=np.float32)
        csr_lanes(indptr, indices, values, x, acc_t)
        epilogue_f32(acc_t, True, bias, code, out)
    else:
        csr_rows_f32(indptr, indices, values, x, out)
        epilogue_f32(out, False, bias, code, out)
    return out


@njit(nogil=True, cache=True, boundscheck=False)
def int_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, xq: np.ndarray, acc: np.ndarray) -> None:
    """Exact int32 ``acc[b, n] = sum_p values[p] * xq[b, indices[p]]`` with one ``vpgatherdd`` per 16 nonzeros
    (``x`` widened to int16: 8 KB for K = 4096, L1 resident)."""
    B, K = xq.shape
    xi = np.zeros(B * K + 1, dtype=np.int16)  # +1: the gathers read 32-bit words at 2-byte steps
    for b in range(B):
        for k in range(K):
            xi[b * K + k] = xq[b, k]
    N = indptr.shape[0] - 1
    for b in range(B):
        for n in range(N):
            acc[b, n] = csr_gather_dot(indices, values, indptr[n], indptr[n + 1], xi, b * K)


@njit(nogil=True, cache=True, boundscheck=False)
def int_lanes(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, xq: np.ndarray, r: int,
              acc_t: np.ndarray) -> None:
    """Exact int32 ``acc_t[n, b]`` (``[N, Bp]``, ``Bp`` = batch rounded up to 16) for int8 CSR (``r == 1``) or
    ``(r, 1)`` block weights over batch lanes: ``xq[B, Kp]`` is transposed to int16 ``[Kp, Bp]`` once."""
    B, K = xq.shape
    N, Bp = acc_t.shape
    xt = np.zeros((K, Bp), dtype=np.int16)
    for b in range(B):
        for k in range(K):
            xt[k, b] = xq[b, k]
    for b0 in range(0, Bp, 64):  # 64 int16 lanes: K * 128 B of x^T, L2 resident
        nv = min(4, (Bp - b0) // 16)
        for n in range(N):
            lanes_i32(indices, values, indptr[n], indptr[n + 1], r, xt, Bp, b0, acc_t, n * Bp + b0, nv)


@njit(nogil=True, cache=True)
def csr_int8_accumulators(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, xq: np.ndarray,
                          lanes_min_batch: int) -> np.ndarray:
    """Exact int32 ``xq[B, K] @ W`` ``[B, N]`` for int8 CSR weights (gathers below ``lanes_min_batch``)."""
    B = xq.shape[0]
    N = indptr.shape[0] - 1
    acc = np.empty((B, N), dtype=np.int32)
    if B >= lanes_min_batch:
        acc_t = np.empty((N, (B + 15) // 16 * 16), dtype=np.int32)
        int_lanes(indptr, indices, values, xq, 1, acc_t)
        for b in range(B):
            for n in range(N):
                acc[b, n] = acc_t[n, b]
    else:
        int_rows(indptr, indices, values, xq, acc)
    return acc


@njit(nogil=True, cache=True)
def csr_int8_forward(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, scales: np.ndarray,
                     bias: np.ndarray, code: int, x: np.ndarray, lanes_min_batch: int) -> np.ndarray:
    """``act(dequant(quant(x) @ Wq) + b)``: dynamic per-row int8 activations, int32 accumulation."""
    B, K = x.shape
    N = indptr.shape[0] - 1
    xq = np.empty((B, K), dtype=np.int8)
    xs = np.empty(B, dtype=np.float32)
    quantize_rows(x, xq, xs)
    out = np.empty((B, N), dtype=np.float32)
    if B >= lanes_min_batch:
        acc_t = np.empty((N, (B + 15) // 16 * 16), dtype=np.int32)
        int_lanes(indptr, indices, values, xq, 1, acc_t)
        epilogue_int(acc_t, True, xs, scales, bias, code, out)
    else:
        acc = np.empty((B, N), dtype=np.int32)
        int_rows(indptr, indices, values, xq, acc)
        epilogue_int(acc, False, xs, scales, bias, code, out)
    return out


class _CsrBase(LayerKernel):
    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, bias: np.ndarray,
                 activation: str, in_features: int) -> None:
        if np.ndim(bias) != 1:
            raise KernelInputError(f"bias must be 1-D [N], got shape {list(np.shape(bias))}")
        self.in_features = int(in_features)
        self.out_features = int(bias.shape[0])
        self.activation = check_activation(activation)
        check_block_arrays(indptr, indices, self.out_features, self.in_features, values)
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(indices, dtype=index_dtype(self.in_features))
        self.values = np.ascontiguousarray(values)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self._code = activation_code(activation)

    @staticmethod
    def _stored(arrays: dict[str, np.ndarray], meta: dict[str, Any], value_dtype: type,
                scaled: bool) -> tuple[np.ndarray, ...]:
        """The checked arrays of a stored layer: (indptr, indices, values, [scales,] bias, activation, in_features)."""
        k, n = meta_int(meta, "in_features"), meta_int(meta, "out_features")
        indptr = stored_array(arrays, "indptr", INDPTR_DTYPES, (n + 1,))
        indices = stored_array(arrays, "indices", INDEX_DTYPES, (None,))
        values = stored_array(arrays, "values", (value_dtype,), (None,))
        check_block_arrays(indptr, indices, n, k, values)
        scales = (stored_array(arrays, "scales", (np.float32,), (n,)),) if scaled else ()
        bias = stored_array(arrays, "bias", (np.float32,), (n,))
        return (indptr, indices, values, *scales, bias, meta_activation(meta), k)

    @property
    def nnz(self) -> int:
        """Number of stored weights."""
        return int(self.values.shape[0])

    def bias_vector(self) -> np.ndarray:
        return self.bias.copy()

    def meta(self) -> dict[str, Any]:
        return {"format": self.format, "activation": self.activation, "in_features": self.in_features,
                "out_features": self.out_features}


class CsrF32(_CsrBase):
    """fp32 CSR (of ``W^T``) sparse layer: stores exactly the nonzeros of ``W``."""

    format = "csr_f32"

    @classmethod
    def from_dense(cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any) -> "CsrF32":
        """Keep every nonzero of fp32 ``weights[K, N]``; no options."""
        if options:
            raise TypeError(f"csr_f32 takes no options, got {sorted(options)}")
        w = np.asarray(weights, dtype=np.float32)
        indptr, indices, values = pack_csr(w)
        return cls(indptr, indices, values, np.asarray(bias, np.float32), activation, w.shape[0])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "CsrF32":
        return cls(*cls._stored(arrays, meta, np.float32, scaled=False))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "values": self.values, "bias": self.bias}

    def dense_weights(self) -> np.ndarray:
        return unpack_csr(self.indptr, self.indices, self.values, self.in_features, self.out_features)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return csr_f32_forward(self.indptr, self.indices, self.values, self.bias, self._code, x, LANES_MIN_BATCH)


class CsrInt8(_CsrBase):
    """int8 CSR sparse layer: per-output-channel weight scales, dynamic per-row activation quantization."""

    format = "csr_int8"

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, scales: np.ndarray,
                 bias: np.ndarray, activation: str, in_features: int) -> None:
        super().__init__(indptr, indices, values.astype(np.int8), bias, activation, in_features)
        self.scales = np.ascontiguousarray(scales, dtype=np.float32)
        if self.scales.shape != (self.out_features,):
            raise KernelInputError(f"csr_int8 needs {self.out_features} scales, got shape {list(self.scales.shape)}")

    @classmethod
    def from_dense(cls, weights: np.ndarray, bias: np.ndarray, activation: str, **options: Any) -> "CsrInt8":
        """Quantize fp32 ``weights[K, N]`` per output channel, then keep the nonzeros of the fp32 weights
        (a weight that rounds to 0 is still stored, so the pattern is exactly ``weights != 0``)."""
        if options:
            raise TypeError(f"csr_int8 takes no options, got {sorted(options)}")
        w = np.asarray(weights, dtype=np.float32)
        q, scales = quantize_weights_per_channel(w)
        indptr, indices, _ = pack_csr(w)
        rows, cols = np.nonzero(w.T)
        return cls(indptr, indices, q.T[rows, cols], scales, np.asarray(bias, np.float32), activation, w.shape[0])

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> "CsrInt8":
        return cls(*cls._stored(arrays, meta, np.int8, scaled=True))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "indices": self.indices, "values": self.values, "scales": self.scales,
                "bias": self.bias}

    def quantized_weights(self) -> np.ndarray:
        """The int8 ``[K, N]`` weights (zeros kept)."""
        return unpack_csr(self.indptr, self.indices, self.values, self.in_features, self.out_features)

    def dense_weights(self) -> np.ndarray:
        return self.quantized_weights().astype(np.float32) * self.scales

    def accumulators(self, xq: np.ndarray) -> np.ndarray:
        """Exact int32 ``xq @ Wq`` for int8 activations ``xq[B, K]`` (for tests)."""
        xq = np.ascontiguousarray(xq, np.int8)
        return csr_int8_accumulators(self.indptr, self.indices, self.values, xq, INT_LANES_MIN_BATCH)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return csr_int8_forward(self.indptr, self.indices, self.values, self.scales, self.bias, self._code, x,
                                INT_LANES_MIN_BATCH)
