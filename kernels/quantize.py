"""Symmetric int8 quantization shared by the int8 kernels (dense and sparse).

Weights: per output channel (column of ``W[K, N]``), ``scale = max|w| / 127``, ``q = rint(w / scale)`` in
[-127, 127]; an all-zero column gets scale 1 and q = 0, so nothing ever divides by zero.

Activations: quantized dynamically per call, **per row**, symmetric signed int8 in [-127, 127] with
``scale_r = max|x_r| / 127`` (a zero row gets scale 1). Per row costs the same single pass as per tensor but keeps
small-magnitude rows of a batch from being crushed by one large row, and makes a row's result independent of
what it was batched with (batching in the server must not change answers). The VNNI path needs unsigned
activations (``vpdpbusd`` is u8 x s8): ``quantize_rows_u8`` stores ``q + 128`` as uint8 and the kernel subtracts
``128 * sum_k q_w[k, n]`` (precomputed per channel), which recovers the signed accumulator exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit

QMAX = 127
_QMAX_F32 = np.float32(QMAX)  # float32 constants keep the quantize loops in float32 (they vectorize)


def quantize_weights_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize fp32 ``w[K, N]`` per output channel: returns (``q`` int8 ``[K, N]``, ``scales`` float32 ``[N]``)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0) if w.shape[0] else np.zeros(w.shape[1], np.float32)
    scales = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scales), -QMAX, QMAX).astype(np.int8)
    return np.ascontiguousarray(q), scales


@njit(nogil=True, cache=True)
def _row_scale(x: np.ndarray, r: int, bits: np.ndarray) -> np.float32:
    # max |x| as an integer max over the sign-cleared IEEE bits (monotonic for non-negative floats): LLVM
    # vectorizes it, unlike the NaN-aware float max. ``bits`` is an int32[1] scratch. A NaN in the
    # row wins the max, so the row's scale (and output) is NaN, as it would be in fp32.
    row = x[r].view(np.int32)  # x must be C-contiguous
    m = np.int32(0)
    for k in range(row.shape[0]):
        b = row[k] & np.int32(0x7FFFFFFF)
        m = b if b > m else m
    bits[0] = m
    amax = bits.view(np.float32)[0]
    if amax > 0.0 or amax != amax:  # NaN: the scale is NaN too (a comparison with NaN is False)
        return amax / _QMAX_F32
    return np.float32(1.0)


@njit(nogil=True, cache=True)
def quantize_rows(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> None:
    """Per-row symmetric int8 quantization of float32 ``x[B, K]`` into ``q`` int8 ``[B, Kq >= K]`` (tail zeroed)
    and ``scales`` float32 ``[B]``."""
    B, K = x.shape
    bits = np.empty(1, dtype=np.int32)
    for r in range(B):
        s = _row_scale(x, r, bits)
        scales[r] = s
        inv = np.float32(1.0) / s
        for k in range(K):
            v = np.rint(x[r, k] * inv)
            v = min(max(v, -_QMAX_F32), _QMAX_F32)
            q[r, k] = np.int8(v)
        for k in range(K, q.shape[1]):
            q[r, k] = 0


@njit(nogil=True, cache=True)
def quantize_rows_u8(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> None:
    """Like ``quantize_rows`` but stores ``q + 128`` as uint8 (VNNI's unsigned operand); the tail is 128 (q = 0)."""
    B, K = x.shape
    bits = np.empty(1, dtype=np.int32)
    for r in range(B):
        s = _row_scale(x, r, bits)
        scales[r] = s
        inv = np.float32(1.0) / s
        for k in range(K):
            v = np.rint(x[r, k] * inv)
            v = min(max(v, -_QMAX_F32), _QMAX_F32)
            q[r, k] = np.uint8(np.int32(v) + 128)
        for k in range(K, q.shape[1]):
            q[r, k] = 128
